"""How the S3 write stream chooses between one PUT and parts (service/checkpoint/backends/s3_upload.py)."""

from __future__ import annotations

import pytest

from service.checkpoint.backends import s3_upload

pytestmark = pytest.mark.timeout(10)


def test_an_unknown_round_trip_keeps_the_single_put_limit():
    assert s3_upload.single_put_limit(None) == s3_upload.SINGLE_PUT_LIMIT


def test_a_store_on_this_host_gets_parts_for_every_file_of_a_part_or_more():
    assert s3_upload.single_put_limit(0.001) < s3_upload.PART_SIZE


def test_a_distant_store_keeps_files_up_to_the_single_put_limit_whole():
    assert s3_upload.single_put_limit(0.25) == s3_upload.SINGLE_PUT_LIMIT
    assert s3_upload.single_put_limit(5.0) == s3_upload.SINGLE_PUT_LIMIT


def test_the_limit_grows_with_the_round_trip():
    limits = [s3_upload.single_put_limit(rtt) for rtt in (0.001, 0.02, 0.05, 0.1, 0.2)]
    assert limits == sorted(limits) and limits[0] < limits[-1]
