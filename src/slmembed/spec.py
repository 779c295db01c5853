"""How a model turns text into one vector: ``EmbedSpec`` (pooling, prompt, max length, EOS, attention), the
poolings and the named prompts, with the rule each field keeps.

No torch here: recipes (config.py) and the command line check these values before anything heavy is imported.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from typing import Any

from slmembed.checks import at_least, one_of
from slmembed.errors import SlmembedError

POOLINGS = ("last", "mean", "cls")
ATTENTIONS = ("causal", "bidirectional")
PROMPTS = {
    # the paper's prompt ablation (its Table 4)
    "P1": 'This sentence: "{}" means in one word: "',
    "P2": "This sentence {} means: ",
    "P3": "{} is: ",
    # Jiang et al. 2023, "Scaling Sentence Embeddings with Large Language Models": the template of their code
    # (github kongds/scaling_sentemb, train_llm.sh, underscores read as spaces)
    "PromptEOL": 'This sentence : "{}" means in one word:"',
    # AnglE's LLM prompt (github SeanLee97/AnglE, angle_emb/angle.py: Prompts.A; its NLI runs' prompt_template)
    "AnglE": 'Summarize sentence "{}" in one word:"',
}


def prompt_rule(value: str) -> str | None:
    """A name in ``PROMPTS``, or a template with exactly one bare ``{}`` (other braces doubled)."""
    try:
        fields = [f[1:] for f in string.Formatter().parse(value) if f[1] is not None]
    except ValueError:  # a single { or }
        fields = []
    if value in PROMPTS or fields == [("", "", None)]:
        return None
    return f"{', '.join(PROMPTS)} or a template with exactly one {{}} for the text (other braces doubled)"


# The rule of each checked field, shared with the recipe's model section (config.ModelConfig).
RULES = {
    "pooling": one_of(*POOLINGS),
    "prompt": prompt_rule,
    "max_length": at_least(2),  # a token and the EOS; texts are cut to fit
    "attention": one_of(*ATTENTIONS),
}


@dataclass(frozen=True)
class EmbedSpec:
    """How a model turns text into one vector; saved with every trained adapter and export."""

    pooling: str = "last"
    prompt: str | None = None
    max_length: int = 150
    append_eos: bool = True
    attention: str = "causal"  # or bidirectional (attention.py); specs saved before it are causal

    def __post_init__(self) -> None:
        for name, check in RULES.items():
            value = getattr(self, name)
            expected = check(value) if value is not None else None
            if expected:
                raise SlmembedError(f"{name}: expected {expected}, got {value!r}")

    @classmethod
    def of(cls, model: Any) -> EmbedSpec:
        """The spec a recipe's model section (``config.ModelConfig``) asks for."""
        return cls(model.pooling, model.prompt, model.max_length, model.append_eos, model.attention)

    @property
    def template(self) -> str:
        return PROMPTS.get(self.prompt, self.prompt) if self.prompt else "{}"

    @property
    def parts(self) -> tuple[str, str]:
        """The template's text before and after the ``{}`` placeholder."""
        prefix, _, suffix = self.template.format("\0").partition("\0")
        return prefix, suffix
