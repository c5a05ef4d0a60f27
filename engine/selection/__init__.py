"""Choosing the model: head search (vectorized trials, successive halving) and learning curves.

- ``space``: the search space (defaults, a JSON/YAML file), random and grid sampling;
- ``vectorized``: many heads of one shape trained at once (stacked parameters), the group task;
- ``single``: one trial per task (fine-tuned backbone stages), with the project's worker step;
- ``halving``: successive halving's rungs and promotions;
- ``search``: the search driver (``run_search``), its results and the retrained best model;
- ``curve``: learning curves over training-set sizes (``run_curve``).
"""
from .space import DEFAULT_SPACE, SearchSpace, trial_train_config
from .search import SearchResult, run_search

__all__ = ["DEFAULT_SPACE", "SearchSpace", "trial_train_config", "SearchResult", "run_search"]
