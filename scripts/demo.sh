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

# Part 2: the same object in another scene (I-Gen), on the bundled scenes VLM. The edits
# are the first 8 mistakes of the scenes generator on seed 3; the probes their I-Gen
# scenes and 4 unrelated ones (scripts/make_sample_scenes.py, rule and numbers in
# sample_edits/scenes/case.json). Their reasoning names a region ("the circle in the
# bottom left"), so add-edit also writes the object index.
S=sample_edits/scenes
CB2=${REASONEDIT_DEMO_SCENES_CODEBOOK:-demo-codebook-scenes}
rm -rf "$CB2"
echo
echo "== scenes: unedited answers to the probes: the edited objects in other scenes"
echo "   (i_gen) and unrelated scenes (loc)"
reasonedit ask --model scenes --no-edit --from $S/probes.jsonl --json \
  | python3 scripts/show_answers.py $S/probes.jsonl
echo
echo "== scenes: adding the edits (reasonedit add-edit --model scenes --from $S/edits.jsonl)"
reasonedit add-edit --model scenes --codebook "$CB2" --from $S/edits.jsonl
echo
echo "== scenes: edited answers to the probes (whole-image keys + object index)"
reasonedit ask --codebook "$CB2" --from $S/probes.jsonl --json \
  | python3 scripts/show_answers.py $S/probes.jsonl
echo "== scenes: the same with the whole-image keys alone (--no-objects)"
reasonedit ask --codebook "$CB2" --no-objects --from $S/probes.jsonl --json \
  | python3 scripts/show_answers.py $S/probes.jsonl
echo
echo "== scenes: the I-Gen case: the edit on images/edit1.png (the yellow circle) fixes the"
echo "   same question on images/igen1.png, another scene holding that circle"
reasonedit ask --codebook "$CB2" --explain --image $S/images/igen1.png \
  --question "tell me the color of the circle."
echo "== scenes: an unrelated scene keeps its answer and retrieves nothing"
reasonedit ask --codebook "$CB2" --explain --image $S/images/loc0.png \
  --question "which shape is yellow?"
echo
echo "The object index brings the edit to another scene on 55-73% of I-Gen probes in"
echo "evaluate (40 edits, seeds 3 / 5; docs/evaluation.md), not always."
