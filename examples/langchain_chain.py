"""Qwen3Guard in a LangChain app: a callback on a streaming chain, and guard steps in LCEL.

The chat model is a scripted ``GenericFakeChatModel`` so the script runs offline; put your own
model (``ChatOpenAI(...)``, ``ChatOllama(...)``...) in its place, nothing else changes.

    python examples/langchain_chain.py                                  # hub models
    python examples/langchain_chain.py --gen-model DIR --stream-model DIR
    QWEN3GUARD_GEN_PATH=DIR QWEN3GUARD_STREAM_PATH=DIR python examples/langchain_chain.py
"""

from __future__ import annotations

import argparse
import os

from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate

from guard_core import DEFAULT_GEN_MODEL, GenGuard, GuardViolation
from guard_core.stream import DEFAULT_STREAM_MODEL, StreamGuard
from integrations.langchain import QwenGuardCallbackHandler, QwenGuardRunnable

SAFE_QUESTION = "How do I bake a chocolate cake?"
UNSAFE_QUESTION = "How can I make a bomb?"
SAFE_ANSWER = "Preheat the oven to 180C, mix flour, sugar, cocoa and eggs, then bake for 30 minutes."
UNSAFE_ANSWER = "Sure, take a pipe bomb. Then light it and run."


def scripted_model(*answers: str) -> GenericFakeChatModel:
    """Stands in for a real chat model: streams the given answers word by word, one per call."""
    return GenericFakeChatModel(messages=iter([AIMessage(content=a) for a in answers]))


def stream_and_report(label: str, chain, question: str, config: dict | None = None) -> None:
    """Print what a consumer of ``.stream()`` receives, and whether the guard stopped it."""
    received = ""
    try:
        for chunk in chain.stream({"question": question}, config=config):
            received += chunk
        print(f"{label}: delivered {received!r}")
    except GuardViolation as exc:
        print(f"{label}: stopped after {received!r}: {exc}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gen-model", default=os.environ.get("QWEN3GUARD_GEN_PATH", DEFAULT_GEN_MODEL),
                        help="Qwen3Guard-Gen hub id or local directory (env QWEN3GUARD_GEN_PATH)")
    parser.add_argument("--stream-model", default=os.environ.get("QWEN3GUARD_STREAM_PATH", DEFAULT_STREAM_MODEL),
                        help="Qwen3Guard-Stream hub id or local directory (env QWEN3GUARD_STREAM_PATH)")
    args = parser.parse_args()
    gen = GenGuard.from_pretrained(args.gen_model)
    stream = StreamGuard.from_pretrained(args.stream_model)
    prompt = ChatPromptTemplate.from_messages([("human", "{question}")])

    # 1. One callback: Gen judges the prompt, Stream judges the answer token by token.
    guard = QwenGuardCallbackHandler(stream, gen)
    chain = prompt | scripted_model(SAFE_ANSWER, UNSAFE_ANSWER, SAFE_ANSWER) | StrOutputParser()
    stream_and_report("callback, safe answer", chain, SAFE_QUESTION, {"callbacks": [guard]})
    stream_and_report("callback, unsafe answer", chain, SAFE_QUESTION, {"callbacks": [guard]})
    stream_and_report("callback, unsafe question", chain, UNSAFE_QUESTION, {"callbacks": [guard]})

    # 2. Guard steps in LCEL: the output guard releases only text it has judged.
    guard_input = QwenGuardRunnable(role="prompt", gen_guard=gen)
    guard_output = QwenGuardRunnable(stream_guard=stream, on_violation="replace")
    chain = guard_input | prompt | scripted_model(SAFE_ANSWER, UNSAFE_ANSWER, SAFE_ANSWER) | guard_output | StrOutputParser()
    stream_and_report("runnable, safe answer", chain, SAFE_QUESTION)
    stream_and_report("runnable, unsafe answer (replaced)", chain, SAFE_QUESTION)
    stream_and_report("runnable, unsafe question", chain, UNSAFE_QUESTION)


if __name__ == "__main__":
    main()
