"""Qwen3Guard in a LangChain app: a callback on a streaming chain, guard steps in LCEL, and a
guard around a chain that judges the answer with the question in view.

The chat model is a scripted ``GenericFakeChatModel`` so the script runs offline; put your own
model (``ChatOpenAI(...)``, ``ChatOllama(...)``...) in its place, nothing else changes.

    python examples/langchain_chain.py                                  # hub models
    python examples/langchain_chain.py --gen-model DIR_OR_URL --stream-model DIR
    QWEN3GUARD_GEN_MODEL=DIR QWEN3GUARD_STREAM_MODEL=DIR python examples/langchain_chain.py
"""

from __future__ import annotations

import argparse
import sys

from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate

from guard_core import CONFIGURED, GuardUnavailableError, GuardViolation, gen_backend, stream_backend
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
    parser.add_argument("--gen-model", default=CONFIGURED,
                        help="Qwen3Guard-Gen hub id, local directory or server URL (default: QWEN3GUARD_GEN_URL / _MODEL)")
    parser.add_argument("--stream-model", default=CONFIGURED,
                        help="Qwen3Guard-Stream hub id or local directory (default: QWEN3GUARD_STREAM_MODEL)")
    args = parser.parse_args()
    try:
        gen, stream = gen_backend(args.gen_model), stream_backend(args.stream_model)  # loaded once, shared below
    except (GuardUnavailableError, ValueError, TypeError) as exc:
        print(f"langchain_chain.py: error: {' '.join(str(exc).split())}", file=sys.stderr)
        raise SystemExit(2) from None
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

    # 3. A guard around the chain: the answer is judged as the reply to the user's question.
    chain = QwenGuardRunnable.around(prompt | scripted_model(SAFE_ANSWER, UNSAFE_ANSWER, SAFE_ANSWER),
                                     gen_guard=gen, stream_guard=stream) | StrOutputParser()
    stream_and_report("around, safe answer", chain, SAFE_QUESTION)
    stream_and_report("around, unsafe answer", chain, SAFE_QUESTION)
    stream_and_report("around, unsafe question", chain, UNSAFE_QUESTION)


if __name__ == "__main__":
    main()
