"""The calling side of crew (the article's name for it); see :mod:`crew.master.tornado`."""
