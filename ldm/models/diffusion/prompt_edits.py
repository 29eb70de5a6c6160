"""Prompt editing: words that change part-way through sampling, written as in AUTOMATIC1111's web UI.

    [to:when]          `to` is added once sampling is `when` of the way through
    [from::when]       `from` is dropped then
    [from:to:when]     `from` is replaced by `to` then

`when` is a fraction in (0, 1) of the way from t = T to t = 0, or a whole number of sampler steps (out of
`steps`). Here the switch is a timestep: `when` = f switches at t = round((1 - f) T), so `from` conditions every
step with t >= that edge and `to` every step below it (on the uniform DDIM grid this is the web UI's step).

Why: a diffusion model draws the layout at high t and the appearance at low t; an appearance word (a colour) that
conditions the high-noise steps pulls the layout towards its own prior and can cost a learned concept its
pattern. `a photo of a [yellow :0.4]*` keeps `yellow` out of t >= 600 (what that gains and costs: docs/usage.md).

A bracket group that is not of these forms (no colon, or a last field that is not a number) is left as text.
"""
import re

GROUP = re.compile(r"\[([^\[\]]*)\]")


def _number(text):
    try:
        return float(text)
    except ValueError:
        return None


def _parse_group(body):
    """The inside of one [...] -> (from, to, when) or None when it is plain text."""
    parts = body.split(":")
    when = _number(parts[-1].strip()) if len(parts) in (2, 3) else None
    if when is None:
        return None
    return ("", parts[0], when) if len(parts) == 2 else (parts[0], parts[1], when)


def _edge(when, num_timesteps, steps, prompt):
    """`when` -> the timestep at which the edit switches (the later text holds for t < edge)."""
    if 0 < when < 1:
        fraction = when
    elif when >= 1 and when == int(when) and when < steps:
        fraction = when / steps
    else:
        raise ValueError(f"prompt edit in {prompt!r}: when = {when:g} is neither a fraction in (0, 1) nor a whole "
                         f"step in 1..{steps - 1}: write e.g. [yellow :0.4] (yellow from 40 % of the way on)")
    return int(round((1 - fraction) * num_timesteps))


def parse(prompt, num_timesteps, steps):
    """prompt -> list of pieces: str (plain text) or (from, to, edge) (one edit, `to` for t < edge)."""
    if re.search(r"[\[\]]", GROUP.sub("", prompt)) and re.search(r"\[[^\[\]]*:\s*[\d.]+", prompt):
        raise ValueError(f"prompt edit in {prompt!r} is nested or not closed: write [from:to:when] groups side by "
                         "side, each closed by ]")
    pieces, end = [], 0
    for m in GROUP.finditer(prompt):
        edit = _parse_group(m.group(1))
        if edit is None:
            continue
        pieces += [prompt[end:m.start()], edit[:2] + (_edge(edit[2], num_timesteps, steps, prompt),)]
        end = m.end()
    return pieces + [prompt[end:]]


def prompt_at(pieces, t):
    """The prompt that conditions timestep t (extra whitespace left by an empty side collapsed)."""
    words = [p if isinstance(p, str) else (p[1] if t < p[2] else p[0]) for p in pieces]
    text = "".join(words)
    return " ".join(text.split()) if len(pieces) > 1 else text


def schedule(prompts, num_timesteps, steps):
    """B prompts -> (edges, texts): edges ascending timesteps where any prompt changes; texts[k] the B prompts of
    segment k (segment 0: t < edges[0]; segment k: edges[k-1] <= t < edges[k]; the last: t >= edges[-1]).
    Without edits: ([], [prompts])."""
    parsed = [parse(p, num_timesteps, steps) for p in prompts]
    edges = sorted({p[2] for pieces in parsed for p in pieces if not isinstance(p, str)})
    starts = [0] + edges
    return edges, [[prompt_at(pieces, t) for pieces in parsed] for t in starts]


def has_edits(prompt):
    """Whether the prompt holds a prompt-edit group (any `when`, valid or not)."""
    return any(_parse_group(b) for b in GROUP.findall(prompt))
