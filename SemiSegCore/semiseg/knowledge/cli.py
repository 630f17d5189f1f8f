"""``semiseg knowledge``: list the task texts, (re)generate one with an LLM, or pre-compute its embedding.

    semiseg knowledge list
    semiseg knowledge generate --structure "left atrium" --modality "LGE cardiac MRI" --model /models/qwen2.5-7b \\
        --out Resources/knowledge/left_atrium.txt [--overwrite]
    semiseg knowledge generate ... --endpoint http://localhost:8000/v1 [--endpoint-model NAME] [--api-key-env VAR]
    semiseg knowledge embed left_atrium [--encoder minilm] [--cache DIR]
"""
from __future__ import annotations

import os
import shlex
import sys


def cmd_list(args) -> int:
    from .texts import available_knowledge, knowledge_dir, read_knowledge

    names = available_knowledge()
    print(f"{len(names)} knowledge text(s) in {knowledge_dir()}")
    for name in names:
        text = read_knowledge(name)
        print(f"  {name:<24} {text[:90]}{'...' if len(text) > 90 else ''}")
    return 0


def cmd_generate(args) -> int:
    from .generate import (build_prompt, generate_with_causal_lm, generate_with_endpoint, knowledge_file_text,
                           write_knowledge)
    from .texts import KnowledgeError

    if os.path.exists(args.out) and not args.overwrite:  # fail before spending minutes on the LLM
        raise FileExistsError(f"{args.out} exists (a person may have edited it); pass --overwrite to replace it")
    prompt = args.prompt or build_prompt(args.structure, args.modality)
    if args.model:
        text = generate_with_causal_lm(args.model, prompt, args.max_new_tokens, device=args.device)
        source = f"the causal LM at {args.model}"
    else:
        key = os.environ.get(args.api_key_env) if args.api_key_env else None
        text = generate_with_endpoint(args.endpoint, prompt, args.endpoint_model, key, args.max_new_tokens,
                                      args.timeout)
        source = f"model '{args.endpoint_model}' at {args.endpoint}"
    if not text.strip():
        raise KnowledgeError(f"{source} returned an empty text; nothing written")
    command = _regenerate_command(args)
    path = write_knowledge(args.out, knowledge_file_text(text, args.structure, args.modality, source, command),
                           overwrite=args.overwrite)
    print(f"wrote {path}:\n{' '.join(text.split())}")
    return 0


def _regenerate_command(args) -> str:
    parts = ["semiseg", "knowledge", "generate", "--structure", args.structure, "--modality", args.modality]
    parts += ["--model", args.model] if args.model else ["--endpoint", args.endpoint, "--endpoint-model",
                                                          args.endpoint_model]
    if args.prompt:
        parts += ["--prompt", args.prompt]
    parts += ["--out", args.out, "--overwrite"]
    return " ".join(shlex.quote(str(a)) for a in parts)


def cmd_embed(args) -> int:
    from .cache import TextEmbeddingCache
    from .texts import read_knowledge

    cache = TextEmbeddingCache(args.cache)
    vector = cache.embed(read_knowledge(args.knowledge), args.encoder)
    print(f"{args.knowledge}: {vector.shape[0]}-d embedding ({args.encoder}), cached in {cache.folder}")
    return 0


def _run(args) -> int:
    from .texts import KnowledgeError

    try:
        return args.knowledge_func(args)
    except KnowledgeError as exc:
        print(f"semiseg knowledge: error: {exc}", file=sys.stderr)
        return 2


def add_knowledge_parser(subparsers) -> None:
    """Add ``knowledge`` (with ``list``, ``generate``, ``embed``) to the ``semiseg`` sub-commands."""
    k = subparsers.add_parser("knowledge", help="task knowledge texts for LLM-SegNet: list, generate, embed")
    sub = k.add_subparsers(dest="knowledge_command", required=True)

    ls = sub.add_parser("list", help="the texts in Resources/knowledge (or $SEMISEG_KNOWLEDGE_DIR)")
    ls.set_defaults(knowledge_func=cmd_list)

    g = sub.add_parser("generate",
                       help="write a knowledge text with a local causal LM or an OpenAI-compatible endpoint")
    g.add_argument("--structure", required=True, help='e.g. "left atrium"')
    g.add_argument("--modality", required=True, help='e.g. "3D late gadolinium-enhanced cardiac MRI"')
    g.add_argument("--out", required=True, help="the .txt file to write (e.g. Resources/knowledge/left_atrium.txt)")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="local folder of a transformers causal LM")
    src.add_argument("--endpoint", help="OpenAI-compatible base URL, e.g. http://localhost:8000/v1")
    g.add_argument("--endpoint-model", default="default", help="model name sent to the endpoint")
    g.add_argument("--api-key-env", help="name of the environment variable holding the endpoint's API key")
    g.add_argument("--prompt", help="use this prompt instead of the built-in one")
    g.add_argument("--max-new-tokens", type=int, default=256)
    g.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the endpoint")
    g.add_argument("--device", default="cpu", help="device for --model (cpu, cuda)")
    g.add_argument("--overwrite", action="store_true", help="replace an existing file")
    g.set_defaults(knowledge_func=cmd_generate)

    e = sub.add_parser("embed", help="encode a text once and store it in the embedding cache")
    e.add_argument("knowledge", help="a name in Resources/knowledge or a path to a text file")
    e.add_argument("--encoder", default="minilm", help="'minilm' or a local transformers model folder")
    e.add_argument("--cache", help="cache folder (default ~/.cache/semiseg/text_embeddings)")
    e.set_defaults(knowledge_func=cmd_embed)

    k.set_defaults(func=_run)
