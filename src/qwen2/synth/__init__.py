"""Post-training data synthesis (Qwen2 Technical Report, section 4.1-4.2): rejection sampling, execution
feedback, instruction evolution, InsTag-style tagging and selection, constitutional feedback, and
decontamination against the evaluation sets. Each pipeline reads JSONL, asks a generation backend
(eval.harness's InProcess or Endpoint) for samples, and writes TRL's conversational SFT / preference
records (data.conversations reads them) plus a manifest, resumably (runner.Run)."""
