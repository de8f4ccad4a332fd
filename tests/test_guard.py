"""The request guard's rules on their own (the served end to end is in test_serve.py)."""

from __future__ import annotations

import json

import pytest

from edgeclf.serve.guard import Limits, RequestRefused, check_http_infer, one_line_error

LIMITS = Limits(max_batch=16, max_request_bytes=1 << 20)


def _body(**tensor) -> bytes:
    return json.dumps({"inputs": [{"name": "pixels", "datatype": "UINT8", **tensor}]}).encode()


@pytest.mark.parametrize("body, header, status, fragment", [
    (_body(shape=[10**12, 75, 75, 3], data=[0]), None, 400, "exceeds the server's max batch 16"),
    (_body(shape=[16, 750, 750, 3]), None, 413, "over the server's request limit"),
    (_body(shape=[1, -3]), None, 400, "non-negative integers"),
    (_body(shape="1,2"), None, 400, "non-negative integers"),
    (_body(shape=[]), None, 400, "non-empty list"),
    (_body(shape=[1, True]), None, 400, "non-negative integers"),
    (_body(shape=[1, 2], data=[[1, 256]]), None, 400, "0..255"),
    (_body(shape=[1, 2], data=[[1, 2.5]]), None, 400, "0..255"),
    (_body(shape=[1, 2], data=[1, 2, 3]), None, 400, "needs 2 values; the request holds more"),
    (_body(shape=[1, 2], datatype="COMPLEX"), None, 400, "unknown datatype"),
    (_body(shape=[1, 2], parameters={"shared_memory_region": "r"}), None, 403, "shared memory"),
    (b'{"inputs": []}', None, 400, "non-empty 'inputs'"),
    (b"[" * 50000 + b"]" * 50000, None, 400, "nested too deeply"),
    (b"\xff\xfe", None, 400, "not valid JSON"),
    (_body(shape=[1, 2], parameters={"binary_data_size": 2}) + b"\x01\x02", "999", 400, "outside the body"),
    (_body(shape=[1, 2], parameters={"binary_data_size": 2}) + b"\x01\x02", "x", 400, "must be an integer"),
])
def test_requests_the_server_cannot_hold_are_refused_with_one_line(body, header, status, fragment):
    with pytest.raises(RequestRefused) as info:
        check_http_infer(body, header, LIMITS)
    assert info.value.status == status and fragment in str(info.value) and "\n" not in str(info.value)


def test_well_formed_requests_pass():
    check_http_infer(_body(shape=[2, 2], data=[[0, 255], [7, 8]]), None, LIMITS)
    header = _body(shape=[1, 2], parameters={"binary_data_size": 2})
    check_http_infer(header + b"\x01\x02", str(len(header)), LIMITS)


def test_a_model_traceback_becomes_its_last_line():
    text = ("Failed to process the request(s) for model 'edgeclf_image_0_1', message: TritonModelException: "
            "Model execute error: Traceback (most recent call last):\n  File \"/srv/edgeclf/serve/server.py\", "
            "line 140, in image\n    frames = ...\nedgeclf.errors.ImageDecodeError: not a readable image "
            "(cannot identify image file). Received: <4 bytes>\n")
    assert one_line_error(text) == ("ImageDecodeError: not a readable image (cannot identify image file). "
                                    "Received: <4 bytes>", True)
    assert one_line_error("unexpected datatype FP32 for input 'pixels'") == (
        "unexpected datatype FP32 for input 'pixels'", False)
    line, client = one_line_error("Traceback (most recent call last):\n  File \"/x.py\"\nsegfault")
    assert "/x.py" not in line and not client
