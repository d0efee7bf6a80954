"""Scoring functions live in :mod:`pktransfer.data.scoring` (tasks score their own items); re-exported here."""

from pktransfer.data.scoring import *  # noqa: F403
from pktransfer.data.scoring import SCORERS, exact_match_number, extract_last_number  # noqa: F401
