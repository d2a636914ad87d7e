"""orproxy reaches HTTPS upstreams through rustls and verifies their certificates.

An HTTPS upstream on loopback with a certificate from a throwaway CA: trusted through
SSL_CERT_FILE the call succeeds; without that CA orproxy refuses the connection.
"""

import json
import os
import ssl
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import openai
import pytest
import trustme

from conftest import Process, binary, json_line, state_directory

ANSWER = {
    "id": "chatcmpl-tls", "object": "chat.completion", "created": 0, "model": "tls-model",
    "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "over TLS"}}],
    "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3},
}


class Upstream(BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers.get("content-length", 0)))
        body = json.dumps(ANSWER).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def https_upstream():
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    server = ThreadingHTTPServer(("127.0.0.1", 0), Upstream)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    cert.configure_cert(context)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    with tempfile.NamedTemporaryFile("wb", suffix=".pem", delete=False) as f:
        f.write(ca.cert_pem.bytes())
    yield f"https://localhost:{server.server_address[1]}/v1", f.name
    server.shutdown()
    os.unlink(f.name)


def start(base_url, ca_file):
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        f.write(f"backends:\n  secure:\n    type: openai\n    base_url: {base_url}\ndefault_backend: secure\n")
    env = dict(os.environ)
    env["STATE_DIRECTORY"] = state_directory()
    env.pop("SSL_CERT_DIR", None)
    if ca_file:
        env["SSL_CERT_FILE"] = ca_file
    else:
        env.pop("SSL_CERT_FILE", None)
    args = [binary("orproxy"), "--config", f.name, "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0", "--log-format", "json"]
    proxy = Process(args, env, "stderr")
    event = proxy.wait_for(lambda line: (e := json_line(line)) and e.get("message") == "Ready." and e)
    os.unlink(f.name)
    return proxy, f"http://{event['listen']}/v1"


def test_a_trusted_https_upstream_answers(https_upstream):
    base_url, ca_file = https_upstream
    proxy, url = start(base_url, ca_file)
    try:
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)
        completion = client.chat.completions.create(model="tls-model", messages=[{"role": "user", "content": "hi"}])
        assert completion.choices[0].message.content == "over TLS"
    finally:
        proxy.stop()


def test_an_untrusted_certificate_is_refused(https_upstream):
    base_url, _ = https_upstream
    proxy, url = start(base_url, None)
    try:
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)
        with pytest.raises(openai.APIStatusError) as err:
            client.chat.completions.create(model="tls-model", messages=[{"role": "user", "content": "hi"}])
        assert err.value.status_code == 502
        assert "certificate" in err.value.message.lower(), err.value.message
    finally:
        proxy.stop()
