"""`mmlm chat`: a real pseudo-terminal session (prompt, streamed reply, /quit), and piped stdin
with the conversation history, /reset, /image and EOF."""

import io
import os
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from _tiny import tiny_checkpoint
from mmlm import Processor, describe, load
from mmlm.cli.main import main

REPO = Path(__file__).resolve().parents[1]
QUESTION = "what color is the star?"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    os.symlink(tiny_checkpoint(tmp_path_factory), root / "model")
    Image.new("RGB", (40, 30), "blue").save(root / "blue.png")
    Image.new("RGB", (30, 40), "red").save(root / "red.png")
    return root


def _read_until(fd, marker: bytes, buf: bytearray, timeout: float = 60) -> bytes:
    deadline = time.monotonic() + timeout
    while marker not in buf:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"timed out waiting for {marker!r}; got {bytes(buf)!r}")
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # the child closed the terminal
                chunk = b""
            if not chunk:
                raise AssertionError(f"terminal closed before {marker!r}; got {bytes(buf)!r}")
            buf += chunk
    i = buf.index(marker) + len(marker)
    seen = bytes(buf[:i])
    del buf[:i]
    return seen


@pytest.mark.skipif(not hasattr(os, "openpty"), reason="needs a POSIX pseudo-terminal")
def test_chat_in_a_pseudo_terminal(ckpt):
    root = ckpt
    master, slave = os.openpty()
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), "TERM": "dumb",
           "OMP_NUM_THREADS": "1"}  # tiny model: threads only contend with the test process
    proc = subprocess.Popen(
        [sys.executable, "-m", "mmlm.cli.main", "chat", str(root / "blue.png"), "--model", str(root / "model"),
         "--max-new-tokens", "6", "--device", "cpu"],
        stdin=slave, stdout=slave, stderr=slave, cwd=REPO, env=env, close_fds=True,
    )
    os.close(slave)
    buf = bytearray()
    try:
        _read_until(master, b"you> ", buf)
        os.write(master, (QUESTION + "\n").encode())
        _read_until(master, b"model> ", buf)
        reply = _read_until(master, b"you> ", buf)
        os.write(master, b"/quit\n")
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
    # the terminal turns "\n" into "\r\n"; the reply is the model's answer to the question
    reply_text = reply[: -len(b"you> ")].decode("utf-8", "replace").replace("\r\n", "\n")
    expected = describe([root / "blue.png"], model=str(root / "model"), prompt=QUESTION, device="cpu",
                        max_new_tokens=6)[0]
    assert expected and reply_text.rstrip("\n") == expected


def test_chat_from_piped_stdin_keeps_history(ckpt, monkeypatch, capsys):
    root = ckpt
    seen = []
    real_encode = Processor.encode

    def spy(self, conversation, images=(), **kw):
        seen.append([m["role"] for m in conversation])
        return real_encode(self, conversation, images, **kw)

    monkeypatch.setattr(Processor, "encode", spy)
    script = f"{QUESTION}\nhow many shapes are there?\n/reset\n{QUESTION}\n/image {root / 'missing.png'}\n" \
             f"/image {root / 'red.png'}\n{QUESTION}\n/help\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO(script))  # EOF after the script ends the chat
    rc = main(["chat", str(root / "blue.png"), "--model", str(root / "model"), "--max-new-tokens", "6",
               "--device", "cpu", "--system", "Answer briefly."])
    out = capsys.readouterr().out
    assert rc == 0
    # each turn: the conversation so far + the new message (history kept until /reset or /image)
    assert seen == [["system", "user"], ["system", "user", "assistant", "user"], ["system", "user"],
                    ["system", "user"]]
    replies = [line[len("model> "):] for line in out.split("\n") if line.startswith("model> ")]
    assert len(replies) == 4
    assert "error: no such image" in out and "/image PATH" in out  # a bad /image goes on; /help
    assert f"you> {QUESTION}" in out

    monkeypatch.undo()
    vlm, processor = load(root / "model", device="cpu")
    processor.config.system_prompt = "Answer briefly."
    expected = describe([root / "blue.png", root / "red.png"], model=(vlm, processor), prompt=QUESTION,
                        max_new_tokens=6, batch_size=1)
    assert [replies[0], replies[3]] == expected and replies[2] == replies[0]


def test_seeded_sampled_chat_reproduces_each_turn_and_draws_anew_per_turn(ckpt, monkeypatch, capsys):
    """--seed: the same session replays the same replies; each turn of it is seeded by its number (the same
    question twice draws two streams), and /reset starts the count again."""
    root = ckpt
    script = "hi\nhi\n/reset\nhi\n"
    args = ["chat", str(root / "blue.png"), "--model", str(root / "model"), "--max-new-tokens", "8", "--device",
            "cpu", "--do-sample", "--temperature", "3", "--seed", "4"]
    runs = []
    for _ in range(2):
        monkeypatch.setattr(sys, "stdin", io.StringIO(script))
        assert main(args) == 0
        runs.append([ln[len("model> "):] for ln in capsys.readouterr().out.split("\n") if ln.startswith("model> ")])
    assert runs[0] == runs[1] and len(runs[0]) == 3
    first, second, after_reset = runs[0]
    assert first != second and after_reset == first


def test_chat_missing_image_is_a_clear_error(ckpt, capsys):
    rc = main(["chat", str(ckpt / "nope.png"), "--model", str(ckpt / "model")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error:") and "nope.png" in err and err.count("\n") == 1


def test_a_typed_image_placeholder_is_refused_and_the_chat_goes_on(ckpt, monkeypatch, capsys):
    """`<image>` in a later message would move the chat's image into that turn: refused, the next message works."""
    root = ckpt
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"look at <image> again\n{QUESTION}\n"))
    assert main(["chat", str(root / "blue.png"), "--model", str(root / "model"), "--max-new-tokens", "4",
                 "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert "<image> marks where the image goes" in captured.out + captured.err
    assert sum(line.startswith("model> ") for line in captured.out.split("\n")) == 1
