"""Node conformance cases expected to fail, each with its reason (see tests/test_onnx_conformance.py).

Keys are regexes matched in full against the case name without its device suffix. The list only
shrinks: the cases run as strict xfails, so a case that starts passing fails until it is removed.
"""

EXPECTED_FAILURES = {
}
