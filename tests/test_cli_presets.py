"""`lfm2-nas presets` as a user runs it: the installed console script, in a subprocess."""

import json

from lfm2 import PUBLISHED_PARAMETERS


def test_presets_json_lists_the_family_with_exact_sizes(lfm2_nas):
    result = lfm2_nas("presets", "--json")
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    by_name = {row["name"]: row for row in rows}
    for name, count in PUBLISHED_PARAMETERS.items():
        assert by_name[name]["parameters"] == count
        assert by_name[f"{name}-attn"]["layout"] == "A" * by_name[name]["layers"]
    assert by_name["LFM2-350M"]["layout"] == "CCACCACCACACACAC"
    assert by_name["LFM2-350M"]["kv_bytes_per_token_bf16"] == 6 * 2 * 8 * 64 * 2


def test_presets_table_and_unknown_command(lfm2_nas):
    assert "LFM2-2.6B" in lfm2_nas("presets").stdout
    bad = lfm2_nas("no-such-command")
    assert bad.returncode == 2 and "no-such-command" in bad.stderr
