"""``slimtrain bench`` and ``slimtrain memory``: the paper's comparison, measured and analytic."""
