"""Caption tools: caption-file rewriting, the template expander, and the OpenAI-compatible client and tools
against a local stand-in server (127.0.0.1, bounded number of requests, stops by itself)."""
import csv
import http.server
import json
import os
import subprocess
import sys
import threading
import time

import pytest

from sora_jax.data import captions
from sora_jax.data import synthetic
from sora_jax.data import video_io

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class FakeEndpoint:
  """Answers /v1/chat/completions; `fail_first` requests get HTTP 503. Serves at most `max_requests`."""

  def __init__(self, fail_first=0, max_requests=20, deadline_s=60.0):
    self.requests, self.fail_first = [], fail_first
    endpoint = self

    class Handler(http.server.BaseHTTPRequestHandler):

      def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        endpoint.requests.append(dict(path=self.path, body=body, auth=self.headers.get("Authorization")))
        if len(endpoint.requests) <= endpoint.fail_first:
          self.send_error(503, "busy")
          return
        content = body["messages"][-1]["content"]
        if isinstance(content, list):  # vision: text part + image parts
          images = [c for c in content if c["type"] == "image_url"]
          reply = f"a video seen in {len(images)} frames"
        else:
          reply = f"detailed: {content}\n(more)"
        data = json.dumps({"choices": [{"message": {"role": "assistant", "content": reply}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

      def log_message(self, *args):
        pass

    self.server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    self.server.timeout = 0.2
    self.url = f"http://127.0.0.1:{self.server.server_port}/v1"
    self._stop = False
    end = time.monotonic() + deadline_s

    def serve():
      while not self._stop and len(self.requests) < max_requests and time.monotonic() < end:
        self.server.handle_request()
      self.server.server_close()

    self.thread = threading.Thread(target=serve, daemon=True)
    self.thread.start()

  def close(self):
    self._stop = True
    self.thread.join(5)


@pytest.fixture
def endpoint(request):
  server = FakeEndpoint(**getattr(request, "param", {}))
  yield server
  server.close()


def _synthetic_captions(n):
  return [synthetic.caption(synthetic.sample_attributes(i)) for i in range(n)]


def test_template_is_deterministic_and_names_every_attribute():
  for i in range(30):
    attrs = synthetic.sample_attributes(i)
    text = synthetic.caption(attrs)
    assert captions.parse_synthetic(text) == dict(attrs)
    long = captions.expand_synthetic(text)
    assert long == captions.expand_synthetic(text) and len(long) > 2 * len(text)
    for value in attrs.values():
      assert value in long.replace("zigzagging", "zigzag")
  assert captions.expand_synthetic("a dog runs on the beach") is None
  # Pinned text: a change of the template changes the data, so it should be deliberate.
  assert captions.expand_synthetic("a small red circle moving left on a black background") == (
      "A small red circle moving left on a black background. The circle is a flat, solid red disc with a smooth "
      "round edge; it is small, about a quarter of the frame across, and travels along a straight, even path "
      "toward the left edge of the frame. Nothing else is in view: a static camera, even lighting and a uniform "
      "black background.")


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_rewrite_keeps_originals_and_other_fields(tmp_path, fmt):
  caps = _synthetic_captions(3) + ["a dog runs on the beach"]
  path = str(tmp_path / f"captions.{fmt}")
  rows = [{"path": f"v{i}.mp4", "caption": c, "fps": "8"} for i, c in enumerate(caps)]
  captions.write_rows(path, rows)
  make = lambda row: (captions.expand_synthetic(captions.original(row)), "template")
  counts = captions.rewrite(path, make, batch_size=2, workers=2, log=lambda _: None)
  assert counts == dict(rows=4, done=3, unchanged=1, failed=0, skipped=0, file=path)
  out = captions.read_rows(path)
  for row, caption in zip(out[:3], caps):
    assert row["caption_original"] == caption and row["caption_source"] == "template"
    assert row["caption"] == captions.expand_synthetic(caption) and row["fps"] == "8"
  assert out[3]["caption"] == caps[3] and not out[3].get("caption_source")
  # Rerun: finished rows are skipped; --redo starts again from the original, not from the extended text.
  assert captions.rewrite(path, make, log=lambda _: None)["skipped"] == 3
  captions.rewrite(path, make, redo=True, log=lambda _: None)
  assert captions.read_rows(path)[0]["caption"] == captions.expand_synthetic(caps[0])
  if fmt == "csv":  # the data pipeline still reads it
    from sora_jax.data import sources
    assert [r["caption"] for r in sources.read_captions(path)][0] == captions.expand_synthetic(caps[0])


@pytest.mark.parametrize("endpoint", [dict(fail_first=2)], indirect=True)
def test_client_retries_then_succeeds(endpoint):
  waits = []
  client = captions.ChatClient(endpoint.url, "m", api_key="k", retries=3, backoff=0.5, sleep=waits.append)
  assert client.complete(captions.extend_messages("a red circle")) == "detailed: a red circle (more)"
  assert waits == [0.5, 1.0] and len(endpoint.requests) == 3
  assert endpoint.requests[0]["path"] == "/v1/chat/completions" and endpoint.requests[0]["auth"] == "Bearer k"


@pytest.mark.parametrize("endpoint", [dict(fail_first=100, max_requests=3)], indirect=True)
def test_client_gives_up_after_bounded_retries(endpoint):
  client = captions.ChatClient(endpoint.url, "m", retries=2, sleep=lambda _: None)
  with pytest.raises(captions.ChatError, match="gave up after 3 attempts, last error HTTP 503"):
    client.complete(captions.extend_messages("x"))
  assert len(endpoint.requests) == 3


def _tool(name, *args, env=None):
  result = subprocess.run([sys.executable, os.path.join(ROOT, "tools", name), *args], capture_output=True,
                          text=True, timeout=120, env={**os.environ, **(env or {})})
  return result, json.loads(result.stdout.strip().splitlines()[-1]) if result.stdout.strip() else None


@pytest.mark.parametrize("endpoint", [dict(fail_first=1)], indirect=True)
def test_extend_prompts_tool_with_endpoint(tmp_path, endpoint):
  path = str(tmp_path / "prompts.jsonl")
  captions.write_rows(path, [{"caption": "a cat", "seed": 1}, {"caption": "a boat at dawn", "seed": 2}])
  result, counts = _tool("extend_prompts.py", f"--captions={path}", f"--url={endpoint.url}", "--model=tiny",
                         "--api_key_env=TEST_CAPTION_KEY", "--backoff=0.01", "--workers=1",
                         env={"TEST_CAPTION_KEY": "secret"})
  assert result.returncode == 0, result.stderr
  assert counts["done"] == 2 and len(endpoint.requests) == 3  # one 503, retried
  rows = captions.read_rows(path)
  assert rows[0] == {"caption": "detailed: a cat (more)", "seed": 1, "caption_original": "a cat",
                     "caption_source": "tiny"}
  assert endpoint.requests[-1]["auth"] == "Bearer secret"
  assert endpoint.requests[-1]["body"]["model"] == "tiny"


def test_extend_prompts_tool_template(tmp_path):
  path = str(tmp_path / "captions.csv")
  caps = _synthetic_captions(2)
  captions.write_rows(path, [{"path": f"{i}.mp4", "caption": c} for i, c in enumerate(caps)])
  result, counts = _tool("extend_prompts.py", f"--captions={tmp_path}")
  assert result.returncode == 0, result.stderr
  assert counts["done"] == 2
  with open(path, newline="") as f:
    rows = list(csv.DictReader(f))
  assert [r["caption"] for r in rows] == [captions.expand_synthetic(c) for c in caps]
  assert [r["caption_original"] for r in rows] == caps


def test_recaption_tool_sends_frames(tmp_path, endpoint):
  attrs = synthetic.sample_attributes(0)
  video = synthetic.render(attrs, 9, 32, 32, seed=0)
  video_io.write_mp4(str(tmp_path / "clip.mp4"), video)
  with open(tmp_path / "clip.txt", "w") as f:  # a sidecar-only folder
    f.write(synthetic.caption(attrs))
  result, counts = _tool("recaption.py", f"--captions={tmp_path}", f"--url={endpoint.url}", "--model=vlm",
                         "--frames=3", "--workers=1")
  assert result.returncode == 0, result.stderr
  assert counts["done"] == 1
  content = endpoint.requests[0]["body"]["messages"][-1]["content"]
  images = [c["image_url"]["url"] for c in content if c["type"] == "image_url"]
  assert len(images) == 3 and all(u.startswith("data:image/jpeg;base64,") for u in images)
  assert synthetic.caption(attrs) in content[0]["text"]  # the hint
  rows = captions.read_rows(str(tmp_path / "captions.jsonl"))
  assert rows == [{"path": "clip.mp4", "caption": "a video seen in 3 frames",
                   "caption_original": synthetic.caption(attrs), "caption_source": "vlm"}]
  assert open(tmp_path / "clip.txt").read() == synthetic.caption(attrs)  # sidecar untouched
