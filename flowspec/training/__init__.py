"""Training a drafter: `flowspec train-drafter` (``train_drafter``: recording the target's
answers and hidden states, the command), the EAGLE head's training, evaluation and export
(``eagle_train``) and its training pass over whole sequences (``eagle_pass``). Offline tools
over ``model/`` and ``speculative/``: nothing in the runtime imports them.
"""
