"""Every import of torch private internals lives in this package, and nowhere else.

Each module groups the internals one layer needs. Symbols that differ between the
supported torch versions (2.11 and 2.13) are feature-detected here with ``hasattr`` /
``inspect.signature``, never by comparing version strings. ``tests/test_compat.py``
imports every module in ``COMPAT_MODULES`` and resolves every name of its ``__all__``, so an
upgrade that moves one fails fast.
"""

# The modules of this package; each one's ``__all__`` lists the private names it provides.
COMPAT_MODULES = (
    "inductor_flex._compat.hop",
    "inductor_flex._compat.joint",
    "inductor_flex._compat.dynamo",
    "inductor_flex._compat.inductor",
    "inductor_flex._compat.pytree",
)
