"""``peft-alps demo``: the offline toy pipeline (``toy``, on ``synthetic`` data) and the real-LLM demo (``real``, on the
``date_task``, with a model from ``builtin_models``); ``resources`` measures what a step costs."""

from peft_alps._moved import forward_old_names

# peft_alps.demo was the module now at peft_alps.demo.toy: its names still resolve, with a warning
__getattr__ = forward_old_names("peft_alps.demo", "peft_alps.demo.toy", globals())
