"""Document selectors: one file per method (PreSelect, ICon, vote-k, SIFT) plus score thresholds."""
