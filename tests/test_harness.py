"""The test harness itself: a test whose event loop saw an unhandled exception fails."""

from __future__ import annotations

from pathlib import Path

import pytest

CONFTEST = Path(__file__).with_name("conftest.py")


def test_an_unretrieved_task_exception_fails_the_test(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(CONFTEST.read_text())
    pytester.makepyfile(
        test_leak="""
        import asyncio

        async def test_leaks_a_failed_task():
            async def boom():
                raise RuntimeError("nobody looks at me")
            task = asyncio.get_running_loop().create_task(boom())
            await asyncio.wait([task])
            del task

        async def test_clean():
            await asyncio.sleep(0)
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-o", "asyncio_mode=auto")
    result.assert_outcomes(passed=2, errors=1)
    result.stdout.fnmatch_lines(["*event loop saw unhandled exceptions*", "*nobody looks at me*"])
