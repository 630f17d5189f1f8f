"""Task knowledge: texts, the real MiniLM encoder, the embedding cache, and `semiseg knowledge generate` with a tiny
local GPT-2 and with an OpenAI-compatible endpoint (a loopback server in the test, and an unreachable one)."""
import argparse
import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import numpy as np
import pytest

from semiseg import knowledge
from semiseg.knowledge import KnowledgeError, TextEmbeddingCache, available_knowledge, read_knowledge
from semiseg.knowledge.cli import add_knowledge_parser
from semiseg.knowledge.generate import generate_with_endpoint

TASKS = ["left_atrium", "acdc_right_ventricle", "acdc_myocardium", "acdc_left_ventricle", "pancreas", "brain_tumour",
         "liver", "polyp"]


def knowledge_cli(argv):
    p = argparse.ArgumentParser()
    add_knowledge_parser(p.add_subparsers(dest="command", required=True))
    args = p.parse_args(["knowledge"] + argv)
    return args.func(args)


def test_shipped_texts_have_provenance_and_no_comment_leaks():
    assert set(TASKS) <= set(available_knowledge())
    for name in TASKS:
        raw = knowledge.resolve_knowledge(name).read_text()
        assert "Written for SemiSeg" in raw and "semiseg knowledge generate" in raw, name
        text = read_knowledge(name)
        assert "#" not in text and "\n" not in text and len(text.split()) > 60, name


def test_unknown_knowledge_names_the_available_ones():
    with pytest.raises(KnowledgeError, match="left_atrium"):
        read_knowledge("no_such_structure")


def test_minilm_embeddings_are_cached_and_meaningful(tmp_path, monkeypatch):
    cache = TextEmbeddingCache(tmp_path)
    la = cache.embed(read_knowledge("left_atrium"))
    assert la.shape == (384,) and abs(np.linalg.norm(la) - 1) < 1e-5
    heart = cache.embed("the left atrium, an upper chamber of the heart that receives the pulmonary veins")
    polyp = cache.embed(read_knowledge("polyp"))
    assert float(la @ heart) > float(la @ polyp) + 0.1  # the encoder reads the meaning
    assert len(list(tmp_path.glob("*.npy"))) == 3 and len(list(tmp_path.glob("*.json"))) == 3

    def no_loading(*a, **k):
        raise AssertionError("the encoder was loaded although the embedding is cached")

    monkeypatch.setattr(knowledge.cache, "load_encoder", no_loading)
    np.testing.assert_array_equal(cache.embed(read_knowledge("left_atrium")), la)
    with pytest.raises(AssertionError, match="was loaded"):  # a changed text is a new key
        cache.embed(read_knowledge("left_atrium") + " Edited.")


def tiny_gpt2(folder):
    """A randomly initialised 1-layer GPT-2 with a byte-level BPE tokenizer trained here (weights do not matter)."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(["the left atrium of the heart in cardiac MRI"] * 10, vocab_size=300,
                            special_tokens=["<|endoftext|>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    tok.save_pretrained(folder)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=512, n_embd=16, n_layer=1, n_head=2,
                               eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id)).save_pretrained(folder)
    return folder


def test_generate_with_a_local_causal_lm(tmp_path, capsys):
    model = tiny_gpt2(tmp_path / "gpt2")
    out = tmp_path / "knowledge" / "left_atrium.txt"
    argv = ["generate", "--structure", "left atrium", "--modality", "LGE MRI", "--model", str(model), "--out", str(out),
            "--max-new-tokens", "12"]
    assert knowledge_cli(argv) == 0
    raw = out.read_text()
    assert raw.startswith("# SemiSeg task knowledge: left atrium in LGE MRI.")
    assert f"--model {model}" in raw and "Written for SemiSeg" in raw
    assert read_knowledge(str(out))  # some generated text after the comments
    with pytest.raises(FileExistsError, match="--overwrite"):  # never replaces a file someone may have edited
        knowledge_cli(argv)
    assert knowledge_cli(argv + ["--overwrite"]) == 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_endpoint_that_cannot_be_reached(tmp_path, capsys):
    url = f"http://127.0.0.1:{free_port()}/v1"
    with pytest.raises(KnowledgeError, match="cannot reach the LLM endpoint .*/v1/chat/completions"):
        generate_with_endpoint(url, "describe", timeout=5)
    out = tmp_path / "x.txt"
    code = knowledge_cli(["generate", "--structure", "liver", "--modality", "CT", "--endpoint", url, "--out", str(out),
                          "--timeout", "5"])
    assert code == 2 and not out.exists()
    assert "cannot reach" in capsys.readouterr().err


def test_endpoint_on_loopback(tmp_path):
    seen = {}

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            seen["path"] = self.path
            seen["body"] = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            reply = json.dumps({"choices": [{"message": {"content": " The liver is large.\n It is bright. "}}]})
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(reply.encode())

        def log_message(self, *a):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        out = tmp_path / "liver.txt"
        url = f"http://127.0.0.1:{server.server_port}/v1"
        assert knowledge_cli(["generate", "--structure", "liver", "--modality", "CT", "--endpoint", url,
                              "--endpoint-model", "m", "--out", str(out)]) == 0
    finally:
        server.shutdown()
    assert seen["path"] == "/v1/chat/completions" and seen["body"]["model"] == "m"
    assert "liver" in seen["body"]["messages"][0]["content"] and seen["body"]["temperature"] == 0
    assert read_knowledge(str(out)) == "The liver is large. It is bright."
