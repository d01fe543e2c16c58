"""Bad settings on the command line: one line naming the setting, exit status 2, no server."""

import pytest

from service.__main__ import main


@pytest.mark.parametrize(
    ("argv", "field"),
    [
        (["--prefill-chunk", "-1"], "prefill_chunk"),
        (["--prefill-chunk", "many"], "prefill_chunk"),
        (["--prefill-chunk", "1"], "prefill_chunk"),
        (["--max-num-batched-tokens", "8"], "max_num_batched_tokens"),
        (["--max-num-seqs", "0"], "max_num_seqs"),
        (["--max-num-seqs", "64", "--max-num-batched-tokens", "64"], "max_num_batched_tokens"),
    ],
)
def test_a_bad_setting_is_one_line_and_exit_2(argv, field, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {field}: ")
