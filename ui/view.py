"""Drawing the comparison screen's pieces: answers, their timings, the prompts each model read,
adapter cards, the vote buttons, the pair table and the ranking. Everything a model or a server wrote is
drawn with `st.text` (or escaped before markdown): model output is shown as text, never as HTML
or markdown.
"""

import re

import streamlit as st

from ui.client import Answer
from ui.ratings import short

DIFF_MARK = "⟦▶ differs from the base model's prompt from here⟧"
VOTE_LABELS = {"A": "A is better", "B": "B is better", "tie": "Tie", "both_bad": "Both bad"}


def escape_markdown(text: str) -> str:
    """Text safe inside st.error/st.caption (which render markdown): every markdown or HTML
    character backslash-escaped."""
    return re.sub(r"([\\`*_{}\[\]()#+\-.!|<>~$&])", r"\\\1", text)


def metrics_line(answer: Answer) -> str:
    parts = []
    if answer.first_token_s is not None:
        parts.append(f"first token {answer.first_token_s * 1000:.0f} ms")
    if answer.total_s is not None:
        parts.append(f"total {answer.total_s:.2f} s")
    if answer.completion_tokens is not None:
        parts.append(f"{answer.completion_tokens} tokens")
    if answer.tokens_per_s is not None:
        parts.append(f"{answer.tokens_per_s:.1f} tok/s")
    return " · ".join(parts)


def answer(slot, a: Answer) -> None:
    """A finished answer in its column: the text, or why there is none; the timings under it."""
    with slot.container():
        if a.error:
            if a.text:
                st.text(a.text)
            st.error(escape_markdown(a.error) + " (not kept in the history)")
        else:
            st.text(a.text or "(empty answer)")
        line = metrics_line(a)
        if line:
            st.caption(line)


def marked_prompt(prompt: str, base_prompt: str | None) -> tuple[str, str]:
    """(prompt with a marker where it starts to differ from the base's, a caption saying so)."""
    if base_prompt is None or prompt == base_prompt:
        return prompt, "the same prompt as the base model" if base_prompt is not None else ""
    same = next((i for i, (x, y) in enumerate(zip(prompt, base_prompt)) if x != y), min(len(prompt), len(base_prompt)))
    return prompt[:same] + DIFF_MARK + prompt[same:], f"differs from the base model's prompt at character {same}"


def prompts(rendered: dict[str, str], base: str, labels: dict[str, str]) -> None:
    """The rendered prompt of each model, side by side, marked where it departs from the base's."""
    columns = st.columns(len(rendered))
    for column, (model, prompt) in zip(columns, rendered.items()):
        with column:
            text, note = marked_prompt(prompt, None if model == base else rendered.get(base))
            st.text(f"prompt of {labels[model]}")
            st.code(text, language=None, wrap_lines=True)
            if note:
                st.caption(escape_markdown(note))


def card(c) -> None:
    """An adapter card from the registry (ui.registry.AdapterCard)."""
    import pandas as pd

    st.dataframe(pd.DataFrame([{"field": k, "value": "" if v is None else str(v)} for k, v in c.summary.items()]),
                 hide_index=True, width="stretch")
    if c.loss_curve:
        st.caption("training loss by step (train: running loss; eval: held-out loss)")
        st.line_chart(pd.DataFrame(c.loss_curve), x="step", y="loss", color="series")
    else:
        st.caption("no loss curve: the adapter has no metrics.json log history")
    if c.run_config_yaml:
        with st.expander("training configuration (run_config.yaml)"):
            st.code(c.run_config_yaml, language="yaml")


def pairs(rows: list[dict]) -> None:
    """The win rate of each pair of revisions that met (ui.ratings.pairs)."""
    import pandas as pd

    if not rows:
        st.caption("no votes yet: turn on Blind A/B in the sidebar, pick two models and vote")
        return
    table = pd.DataFrame(rows)
    for column in ("revision_x", "revision_y"):
        table[column] = table[column].map(short)
    table[["win_rate", "low", "high"]] = table[["win_rate", "low", "high"]].round(3)
    st.caption("win rate of X over Y (ties and both bad count half), with its 95% bootstrap interval low to high")
    st.dataframe(table, hide_index=True, width="stretch")


def ranking(rows: list[dict]) -> None:
    """The Bradley-Terry ranking (ui.ratings.bradley_terry) as a table and a chart with its intervals."""
    import altair as alt
    import pandas as pd

    if not rows:
        return
    table = pd.DataFrame(rows)[["model", "revision", "rating", "low", "high", "votes"]]
    table["label"] = [r["model"] if short(r["revision"]) == r["revision"] else f"{r['model']} · {short(r['revision'], 7)}"
                      for r in rows]  # the chart's: one model's names may differ by revision only
    table["revision"] = table["revision"].map(short)
    table[["rating", "low", "high"]] = table[["rating", "low", "high"]].round(0)
    st.caption("Bradley-Terry ranking on Chatbot Arena's scale (400 * log10 strength, mean 1000), 95% bootstrap interval")
    st.dataframe(table.drop(columns="label"), hide_index=True, width="stretch")
    y = alt.Y("label:N", sort=None, title=None, axis=alt.Axis(labelLimit=400))
    x = alt.X("rating:Q", scale=alt.Scale(zero=False), title="rating, with its 95% interval")
    points = alt.Chart(table).mark_circle(size=80).encode(x=x, y=y)
    whiskers = alt.Chart(table).mark_rule(color="black").encode(x="low:Q", x2="high:Q", y=y)
    st.altair_chart(points + whiskers, width="stretch")
