"""Word lists shared by the stages that look at English text. Two lists, each tuned to its job (changing either
changes what it computes): BTR's salience ignores function words but keeps question words, because a passage's
"who" or "when" can be the token that matters; the Sources panel's sentence matching ignores question words too,
because every question has one and no passage sentence should win by sharing it."""
from __future__ import annotations

FUNCTION_WORDS = frozenset("""a an and are as at be been but by for from had has have he her his i in is it its of on or
that the their them they this to was were which who will with not no so than then there these those we you
your our she him also into about over after before such can could would should may might do does did""".split())

MATCHING_STOPWORDS = frozenset("""a an and are as at be by did do does for from had has have how i in is it its of on or
that the their this to was were what when where which who whom why will with you your""".split())
