import pytest

@pytest.mark.gen_test(timeout=20)
async def test_echo(make_worker, client, uid):
    make_worker({f"echo.{uid}": lambda x: x})
    assert await client.call(f"echo.{uid}", {"a": [1, 2]}) == {"a": [1, 2]}
