"""Reproduce the toy Countdown reasoner's warm-start weights (see models/countdown-toy/README.md).

    .venv/bin/python scripts/train_toy_reasoner.py models/countdown-toy --steps 6000 --seed 0
"""

from rlmem.toy.warmstart import main

if __name__ == "__main__":
    main()
