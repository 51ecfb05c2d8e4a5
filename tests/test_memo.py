from ragdemo.engine.memo import BoundedCache, lm_memo


def test_bounded_cache_drops_the_least_recently_used_past_its_bound():
    cache = BoundedCache(10, size=len)
    cache.get("a", lambda: "xxxx")
    cache.get("b", lambda: "yyyy")
    assert cache.get("a", lambda: "never") == "xxxx"  # a hit: not recomputed, and now the most recent
    cache.get("c", lambda: "zzzz")  # 12 > 10: "b", the least recently used, goes
    assert list(cache) == ["a", "c"] and cache.total == 8
    cache.get("huge", lambda: "w" * 50)  # over the bound alone: kept, everything older dropped
    assert list(cache) == ["huge"]


def test_memos_belong_to_their_lm():
    class LM:
        pass

    one, two = LM(), LM()
    assert lm_memo(one, "x", 5) is lm_memo(one, "x", 5)
    assert lm_memo(one, "x", 5) is not lm_memo(two, "x", 5)
