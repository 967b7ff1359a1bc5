from bench.__main__ import merge


def test_only_replaces_the_rows_of_the_groups_it_ran():
    previous = [{"group": "votek", "measure": "a"}, {"group": "preselect", "measure": "old"}, {"group": "sift", "measure": "b"}]
    rows = [{"group": "preselect", "measure": "new 1"}, {"group": "preselect", "measure": "new 2"}]
    assert [(r["group"], r["measure"]) for r in merge(previous, rows)] == [
        ("preselect", "new 1"), ("preselect", "new 2"), ("sift", "b"), ("votek", "a")
    ]
