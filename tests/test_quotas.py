"""Tenant quotas on calls: the usage tables and the quota book (fnserver/_quotas.py).

The tables are plain objects with no event loop: the rules are tested here directly; the
quotas end to end, through real servers and tokens, are in tests/test_tenants_quotas.py.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from fnserver._quotas import BuildCounter, LocalUsage, QuotaBook, SharedUsage, UsageTable
from fnserver.config import TenantLimits
from fnserver.protocol import QuotaExceededError


def test_overrides_take_only_what_they_set() -> None:
    book = QuotaBook(TenantLimits(max_functions=5, max_rps=10.0))
    book.set_overrides({"big": TenantLimits(max_functions=50)})
    assert book.limits("big") == TenantLimits(max_functions=50, max_rps=10.0)
    assert book.limits("other") == TenantLimits(max_functions=5, max_rps=10.0)
    book.set_overrides({})
    assert book.limits("big") == TenantLimits(max_functions=5, max_rps=10.0)


def test_metered_only_with_a_call_quota() -> None:
    assert not TenantLimits(max_functions=1, max_builds=1).metered
    assert TenantLimits(max_concurrency=1).metered
    assert TenantLimits(max_rps=1.0).metered


@pytest.fixture(params=["local", "shared"])
def usage(request: pytest.FixtureRequest) -> UsageTable:
    if request.param == "local":
        return LocalUsage()
    table = SharedUsage.create()
    request.addfinalizer(table.close)
    mine = SharedUsage(os.dup(table.fd), 0)
    request.addfinalizer(mine.close)
    return mine


def test_concurrency_counts_running_calls_per_tenant(usage: UsageTable) -> None:
    two = TenantLimits(max_concurrency=2)
    usage.enter("a", two)
    usage.enter("a", two)
    with pytest.raises(QuotaExceededError) as exc:
        usage.enter("a", two)
    assert exc.value.details == {"quota": "concurrency", "tenant": "a", "limit": 2, "current": 2}
    assert "tenant 'a'" in str(exc.value) and "limit 2" in str(exc.value)
    usage.enter("b", two)  # another tenant's calls are its own
    usage.leave("a")
    usage.enter("a", two)  # a slot came back


def test_rate_is_a_token_bucket_of_one_seconds_worth(usage: UsageTable) -> None:
    # One call per 1000 s: the bucket holds one token, and no refill happens within a test.
    slow = TenantLimits(max_rps=0.001)
    usage.enter("a", slow)
    usage.leave("a")
    with pytest.raises(QuotaExceededError) as exc:
        usage.enter("a", slow)
    assert exc.value.details["quota"] == "rps"
    assert exc.value.details["limit"] == 0.001
    usage.enter("b", slow)  # buckets are per tenant
    usage.leave("b")


def test_a_refused_call_is_not_counted(usage: UsageTable) -> None:
    one = TenantLimits(max_concurrency=1)
    usage.enter("a", one)
    with pytest.raises(QuotaExceededError):
        usage.enter("a", one)
    usage.leave("a")
    usage.enter("a", one)  # the refusal took nothing


def test_the_shared_table_sums_every_process_column() -> None:
    table = SharedUsage.create()
    try:
        first = SharedUsage(os.dup(table.fd), 0)
        second = SharedUsage(os.dup(table.fd), 1)
        two = TenantLimits(max_concurrency=2)
        first.enter("t", two)
        second.enter("t", two)
        with pytest.raises(QuotaExceededError):
            first.enter("t", two)
        assert table.running("t") == 2
        # The process in column 1 died mid-call: its successor starts from zero there.
        table.reset_column(1)
        assert table.running("t") == 1
        first.enter("t", two)
        first.close()
        second.close()
    finally:
        table.close()


def test_the_shared_table_is_shared_with_another_process() -> None:
    table = SharedUsage.create()
    try:
        mine = SharedUsage(os.dup(table.fd), 0)
        mine.enter("t", TenantLimits(max_concurrency=1))
        code = (
            "import sys\n"
            "from fnserver._quotas import SharedUsage\n"
            "from fnserver.config import TenantLimits\n"
            "from fnserver.protocol import QuotaExceededError\n"
            "other = SharedUsage(int(sys.argv[1]), 1)\n"
            "try:\n"
            "    other.enter('t', TenantLimits(max_concurrency=1))\n"
            "except QuotaExceededError:\n"
            "    print('refused')\n"
            "other.enter('u', TenantLimits(max_concurrency=1))\n"
            "print(other.running('u'))\n"
        )
        out = subprocess.run(
            [sys.executable, "-c", code, str(table.fd)],
            pass_fds=(table.fd,), capture_output=True, text=True, timeout=60, check=True,
        )
        assert out.stdout.split() == ["refused", "1"]
        assert table.running("u") == 1  # counted by the other process, seen here
        mine.close()
    finally:
        table.close()


def test_builds_are_counted_per_tenant() -> None:
    builds = BuildCounter()
    one = TenantLimits(max_builds=1)
    with builds.hold("a", one):
        with pytest.raises(QuotaExceededError) as exc:
            with builds.hold("a", one):
                pass
        assert exc.value.details == {"quota": "builds", "tenant": "a", "limit": 1, "current": 1}
        with builds.hold("b", one):
            pass
    with builds.hold("a", one):
        pass
