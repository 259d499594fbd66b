"""The data package's one exception, in a module of its own so that the submodules that raise it
do not import the package that imports them."""


class DataError(RuntimeError):
    """Raised before training starts when the data set is missing, empty or unreadable."""
