"""Evaluation (SPEC section 8, paper section 5.1): the harness, one task a file (HumanEval with execution,
GSM8K and MATH answer checkers, log-likelihood tasks), the code sandbox, and needle-in-a-haystack.

    from qwen2.eval.sandbox import run_program
    from qwen2.eval.humaneval import load_problems, check_completion, score
    from qwen2.eval.answers import gsm8k_correct, math_equal

Nothing heavy is imported here: each task module loads only what it needs.
"""


def __getattr__(name):  # lazy: `from qwen2.eval import evaluate` imports the harness only when asked
    if name == "evaluate":
        from qwen2.eval.harness import evaluate

        return evaluate
    raise AttributeError(f"module 'qwen2.eval' has no attribute {name!r}")
