"""``python -m wanjax.train``: see `wanjax.train.cli`."""

from wanjax.train.cli import main

main()
