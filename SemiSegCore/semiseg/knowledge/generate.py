"""Write a task-knowledge text with an LLM the user has: a transformers causal LM in a local folder, or an
OpenAI-compatible chat-completions endpoint (a local server such as vLLM, llama.cpp or Ollama, or a hosted one).
Nothing here runs at training or inference time; the text is a static, editable file."""
from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from pathlib import Path

from .texts import KnowledgeError

PROMPT = ("In 4 to 6 sentences of plain prose, describe for an image-segmentation model the {structure} as seen in "
          "{modality}: its anatomical location, neighbouring structures, shape, typical size, and image appearance "
          "(intensity, texture, and where its boundary is hard to see). No lists, no headings, no references.")


def build_prompt(structure: str, modality: str) -> str:
    return PROMPT.format(structure=structure, modality=modality)


def generate_with_causal_lm(model_path: str | Path, prompt: str, max_new_tokens: int = 256, seed: int = 0,
                            device: str = "cpu") -> str:
    """Deterministic (greedy) generation with a local transformers causal LM; uses the
    tokenizer's chat template when it has one. Returns only the newly generated text."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(model_path).expanduser()
    if not (path / "config.json").is_file():
        raise KnowledgeError(f"--model {model_path}: not a local transformers model folder (no config.json)")
    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True).to(device).eval()
    if getattr(tok, "chat_template", None):
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)
    else:
        ids = tok(prompt, return_tensors="pt")
    ids = {k: v.to(device) for k, v in ids.items()}
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    with torch.inference_mode():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
    return tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def chat_completions_url(endpoint: str) -> str:
    """Accepts a base URL (``http://host:8000/v1``) or the full ``.../chat/completions`` URL."""
    endpoint = endpoint.rstrip("/")
    return endpoint if endpoint.endswith("/chat/completions") else endpoint + "/chat/completions"


def generate_with_endpoint(endpoint: str, prompt: str, model: str = "default", api_key: str | None = None,
                           max_tokens: int = 256, timeout: float = 60.0) -> str:
    """One chat-completions request (temperature 0) to an OpenAI-compatible server."""
    url = chat_completions_url(endpoint)
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": prompt}], "temperature": 0,
                       "max_tokens": max_tokens}).encode()
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            reply = json.loads(resp.read().decode("utf-8"))
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode("utf-8", "replace")[:300]
        raise KnowledgeError(f"LLM endpoint {url} answered HTTP {exc.code}: {detail}") from exc
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise KnowledgeError(f"cannot reach the LLM endpoint {url}: {reason}") from exc
    except json.JSONDecodeError as exc:
        raise KnowledgeError(f"LLM endpoint {url} did not answer JSON ({exc})") from exc
    try:
        return str(reply["choices"][0]["message"]["content"]).strip()
    except (KeyError, IndexError, TypeError) as exc:
        raise KnowledgeError(f"LLM endpoint {url}: unexpected answer (no choices[0].message.content): "
                             f"{str(reply)[:300]}") from exc


def knowledge_file_text(text: str, structure: str, modality: str, source: str, command: str) -> str:
    """The file as written: provenance comments (ignored when encoding) and the generated paragraph."""
    header = [f"# SemiSeg task knowledge: {structure} in {modality}.",
              f"# Written for SemiSeg by `semiseg knowledge generate` with {source} on {time.strftime('%Y-%m-%d')}.",
              "# Edit freely: lines starting with '#' are comments and are not encoded.",
              f"# Regenerate: {command}"]
    return "\n".join(header) + "\n" + " ".join(text.split()) + "\n"


def write_knowledge(path: str | Path, content: str, overwrite: bool = False) -> Path:
    from ..utils import atomic_write_text

    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists (a person may have edited it); pass --overwrite to replace it")
    return atomic_write_text(path, content)
