"""GET /sdrt/v1/model-form: what the web page's form shows for the current model, from its family (Family.form):
the steps and CFG defaults, the family's own fields (FLUX.1 dev's Distilled CFG Scale, SD 3.5's skip-layer
guidance), each with its A1111 request field, label (its infotext key), kind, default and help, and whether the
negative prompt applies (FLUX.1: only with true CFG, cfg_scale > 1)."""

from fastapi.concurrency import run_in_threadpool

from sdrt.runtime.families import family_of
from sdrt.runtime.options import spec


def model_form(manifest) -> dict:
    family = family_of(manifest)
    form = family.form(manifest)
    fields = []
    for name, default in form["fields"].items():
        s = spec(name)
        fields.append({"name": name, "field": s.a1111, "label": s.infotext, "kind": s.kind, "default": default,
                       "help": s.help})  # fmt: skip
    return {"family": family.name, "title": family.title, "defaults": form["defaults"],
            "negative_prompt": form["negative_prompt"], "fields": fields}  # fmt: skip


def add_routes(app, server) -> None:
    @app.get("/sdrt/v1/model-form")
    async def model_form_route():
        """The current model's form (sd_model_checkpoint): defaults, the family's own fields, the negative prompt's
        rule; the web page builds its family fields from it."""
        return model_form(await run_in_threadpool(lambda: server.manifest))
