#!/usr/bin/env bash
# The README demo: the bundled model answers sample questions wrongly, then an edit with
# reasoning fixes them, including questions the edit never saw.
set -euo pipefail
cd "$(dirname "$0")/.."
CB=${REASONEDIT_DEMO_CODEBOOK:-demo-codebook}
rm -rf "$CB"
echo "== unedited answers to the edited questions (reasonedit ask --no-edit)"
reasonedit ask --no-edit --from sample_edits/edits.jsonl --json \
  | python3 scripts/show_answers.py sample_edits/edits.jsonl
echo "== unedited answers to the probes"
reasonedit ask --no-edit --from sample_edits/probes.jsonl --json \
  | python3 scripts/show_answers.py sample_edits/probes.jsonl
echo
echo "== adding the sample edits (reasonedit add-edit --from sample_edits/edits.jsonl)"
reasonedit add-edit --codebook "$CB" --from sample_edits/edits.jsonl
echo
echo "== edited answers to the edited questions (reasonedit ask)"
reasonedit ask --codebook "$CB" --from sample_edits/edits.jsonl --json \
  | python3 scripts/show_answers.py sample_edits/edits.jsonl
echo "== edited answers to the probes: rephrased (t_gen), other image (i_gen),"
echo "   shared reasoning (r_gen), unrelated (loc)"
reasonedit ask --codebook "$CB" --from sample_edits/probes.jsonl --json \
  | python3 scripts/show_answers.py sample_edits/probes.jsonl
echo
echo "== the same probes with a looser rejection threshold (--percentile 50):"
echo "   more generality, less locality (see README, Evaluation)"
reasonedit ask --codebook "$CB" --percentile 50 --from sample_edits/probes.jsonl --json \
  | python3 scripts/show_answers.py sample_edits/probes.jsonl
echo
echo "Try: reasonedit ask --codebook $CB --explain --image sample_edits/images/<file> --question '...'"
