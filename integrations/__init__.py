"""Thin adapters that put guard_core in front of LLM frameworks (LangChain, LlamaIndex, OpenAI)."""
