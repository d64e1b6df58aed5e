"""barlow.import_stand_in: placeholders exist only inside the block, and never shadow a module already imported."""
from __future__ import annotations

import sys

from barlow.import_stand_in import stand_in


def test_placeholders_stand_in_only_inside_the_block():
    names = {"barlow_test_pkg": {}, "barlow_test_pkg.sub": {"x": 1}}
    with stand_in(names):
        import barlow_test_pkg.sub as sub
        from barlow_test_pkg.sub import x
        assert x == 1 and sub is sys.modules["barlow_test_pkg"].sub
    assert not {"barlow_test_pkg", "barlow_test_pkg.sub"} & set(sys.modules)


def test_an_imported_module_is_left_as_it_is():
    real = sys.modules["json"]
    with stand_in({"json": {"loads": None}, "json.extra": {}}):
        assert sys.modules["json"] is real and "json.extra" not in sys.modules
    assert sys.modules["json"] is real
