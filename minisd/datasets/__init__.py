"""Data files that ship inside minisd: ``digits.npz`` (read by :func:`minisd.data.load_digits`),
with its citation and license in ``DIGITS_LICENSE.md``. No code lives here."""
