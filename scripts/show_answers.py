"""Print `ask --json` output next to the expected answers of a probe file (used by demo.sh)."""

import json
import sys

from reasonedit_cli.evaluation import exact_match

probes = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
answers = [json.loads(line) for line in sys.stdin if line.strip()]
right = 0
for probe, ans in zip(probes, answers):
    ok = exact_match(ans["answer"], probe["answer"])
    right += ok
    mark = "ok " if ok else "BAD"
    facts = f"  <- {len(ans['facts'])} fact(s)" if ans.get("facts") else ""
    if (ans.get("object_index") or {}).get("facts"):
        facts += " (from the object index)"
    print(
        f"{mark} [{probe.get('kind', 'edit'):7}] {probe['question']!r:45} -> {ans['answer']!r}"
        f" (expected {probe['answer']!r}){facts}"
    )
print(f"{right}/{len(probes)} correct")
