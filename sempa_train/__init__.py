"""SemPA: sentence embeddings from a generative LLM through sentence-level DPO on paraphrases.

The library behind the ``sempa`` command and the Prefect flows in ``pipelines/``: loading NLI data,
building preference triples, DPO training, PromptEOL embeddings and STS evaluation, as plain
functions with no orchestration inside.
"""

__version__ = "0.1.0"
