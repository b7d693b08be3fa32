"""The journal an operator reads: one INFO line a training cycle and one a kind of wait;
the epochs, every later tick's wait and a delivery at its first try at DEBUG, which
`daemon.log_level = "debug"` shows."""

from __future__ import annotations

import os
import re
from pathlib import Path

from helpers import Running, smocsd, write_config

from smocsd.data import demo


def journal_env(log: Path) -> dict[str, str]:
    """The environment under which `log`, as the daemon's stderr, is the journal's stream
    ($JOURNAL_STREAM names its device and inode): each line `<PRIORITY>logger: message`."""
    log.touch()
    st = log.stat()
    return {**os.environ, "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}


def at(priority: int, text: str) -> list[str]:
    """The lines of one syslog priority (6 info, 7 debug), without their prefix."""
    prefix = f"<{priority}>"
    return [line.removeprefix(prefix) for line in text.splitlines() if line.startswith(prefix)]


def test_a_cycle_is_one_info_line_and_its_epochs_are_debug(tmp_path, mosquitto):
    """v1's result waits in the outbox (no broker then); the daemon delivers it (news: a
    delivery held back), trains v2 on the new rows, delivers its result at the first try
    and then waits at every tick for more rows."""
    state = tmp_path / "state"
    demo.write(state / "readings.db", 3000)
    cfg = write_config(
        tmp_path / "c.toml", state, daemon={"check_interval": "0.3s", "log_level": "debug"}
    )
    smocsd("train-once", config=cfg, check=True)
    demo.write(state / "readings.db", 600)  # min_new_samples is 500: v2 is due
    cfg.write_text(
        cfg.read_text().replace("order = []", 'order = ["mqtt"]')
        + f"\n[publish.mqtt]\nport = {mosquitto.port}\n"
    )
    log = tmp_path / "journal"
    d = Running(cfg, log, env=journal_env(log))
    try:
        d.wait_for(" v2: ")
        d.wait_for("autoencoder: skipped: ", count=4)
        assert d.stop() == 0
    finally:
        d.close()
    text = d.text()
    # Live scoring (on by default) says once which version it scores with, at its start
    # and after the promotion: its own event, not the cycle's.
    scoring = [line for line in at(6, text) if line.startswith("smocsd.app.live: ")]
    scored_by = (1, 2) if "promoted v2: " in text else (1,)  # a rejected v2 is not scored with
    assert scoring == [
        f"smocsd.app.live: autoencoder: scoring with v{v} from the next window on"
        for v in scored_by
    ], text
    info = [line for line in at(6, text) if line not in scoring]
    assert info[:2] + info[3:] == [
        f"smocsd: smocsd started: device gw-test, state in {state}",
        "smocsd: delivered 1 result(s); 0 waiting",
        "smocsd: autoencoder: skipped: 0 new rows of 500 needed",
        "smocsd: smocsd stopped",
    ], text
    assert re.fullmatch(
        r"smocsd\.app\.cycle: autoencoder: (promoted v2: |rejected v2: .+; )3600 rows "
        # three networks (the demo's three channels) of at most 4 epochs each
        r"\(\d+ dropped\), \d+ training and \d+ validation windows, (?:[3-9]|1[0-2])/12 "
        r"epochs"
        r"( \(warm start\))?, train_loss \S+, val_loss \S+, threshold \S+, took [\d.]+s",
        info[2],
    ), info[2]
    debug = at(7, text)
    epochs = [line for line in text.splitlines() if "training v2: epoch " in line]
    assert epochs and all(line[3:] in debug for line in epochs), text
    assert "smocsd: delivered 1 result(s); 0 waiting" in debug  # v2's, at its first try
    assert debug.count("smocsd: autoencoder: skipped: 0 new rows of 500 needed") >= 3
