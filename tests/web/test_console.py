"""The console's pages and forms through httpx (the browser tests in test_browser.py drive the same in Chromium)."""

from __future__ import annotations

import re

import httpx

from sagas.engine.state import SagaStatus
from tests.web.served import TOKENS, Stack, alice


async def sign_in(served: Stack, token: str = TOKENS["alice"], next_url: str = "/") -> httpx.Response:
    """Sign in as a browser does: open the sign-in page (its CSRF field and pre-session cookie), post the token."""
    form = await served.client.get("/login")
    response = await served.client.post("/login", data={"token": token, "next": next_url,
                                                        "csrf": csrf_of(form.text)})
    assert response.status_code == 303, response.text
    return response


def csrf_of(html: str) -> str:
    found = re.search(r'name="csrf" value="([0-9a-f]+)"', html)
    assert found is not None
    return found.group(1)


async def test_pages_need_a_signed_in_operator_and_a_wrong_token_signs_nobody_in(served: Stack) -> None:
    """Without a session the console redirects to sign in; a wrong token is refused; the right one lets in."""
    first = await served.client.get("/sagas")
    assert first.status_code == 303
    assert first.headers["location"].startswith("/login?next=")
    form = await served.client.get("/login")
    wrong = await served.client.post("/login", data={"token": "nope-nope-nope-nope", "next": "/",
                                                     "csrf": csrf_of(form.text)})
    assert wrong.status_code == 401
    assert "not known" in wrong.text
    await sign_in(served)
    cookie = served.client.cookies.get("sagas_session")
    assert cookie is not None
    assert TOKENS["alice"] not in cookie  # the token itself is never stored in the browser
    page = await served.client.get("/")
    assert page.status_code == 200
    assert "signed in as <strong id=\"operator\">alice</strong>" in page.text


async def test_a_parked_saga_is_found_retried_with_confirmation_and_csrf(served: Stack) -> None:
    """The overview lists a parked saga; its page marks the failed compensation in the graph; a retry without
    CSRF is refused, with it asks to confirm, and the confirmation retries it under the operator's name."""
    saga_id = await served.parked()
    served.switch.refund_broken = False
    await sign_in(served)
    overview = (await served.client.get("/")).text
    assert f'href="/sagas/{saga_id}"' in overview
    page = (await served.client.get(f"/sagas/{saga_id}")).text
    assert "refund gateway down" in page  # the reason, in the header
    assert 'data-node="c1" data-mark="failed"' in page  # charge's compensation, where it is parked
    assert 'data-node="s2" data-mark="failed"' in page  # ship, declined
    assert 'data-node="s1" data-mark="done"' in page  # charge was done; its undoing is what failed
    assert 'data-node="c0" data-mark="unreached"' in page  # reserve's refund comes after charge's
    no_csrf = await served.client.post(f"/sagas/{saga_id}/retry", data={"reason": "back"})
    assert no_csrf.status_code == 403
    csrf = csrf_of(page)
    ask = await served.client.post(f"/sagas/{saga_id}/retry", data={"reason": "gateway back", "csrf": csrf})
    assert ask.status_code == 200
    assert "Confirm: retry" in ask.text
    assert (await served.admin.get(saga_id)).status is SagaStatus.FAILED  # nothing done yet
    done = await served.client.post(f"/sagas/{saga_id}/retry",
                                    data={"reason": "gateway back", "csrf": csrf, "confirm": "yes"})
    assert done.status_code == 303
    assert (await served.settled(saga_id)).status is SagaStatus.COMPENSATED
    timeline = (await served.client.get(f"/sagas/{saga_id}")).text
    assert "operator.retry" in timeline
    assert "alice" in timeline.split('id="history"')[1]


async def test_an_action_without_a_session_is_refused(served: Stack) -> None:
    """A repair form posted without signing in changes nothing and says why."""
    saga_id = await served.parked()
    refused = await served.client.post(f"/sagas/{saga_id}/abort", data={"reason": "x", "confirm": "yes"})
    assert refused.status_code == 401
    assert "sign in" in refused.text
    assert (await served.admin.get(saga_id)).status is SagaStatus.FAILED


async def test_what_a_saga_carries_is_shown_as_text(served: Stack) -> None:
    """A `<script>` in a saga's input is escaped on its page, never run."""
    order = {"order_id": "<script>alert('x')</script>", "amount": 1}
    saga_id = (await served.client.post("/api/sagas", headers=alice(),
                                        json={"definition": "order", "input": order})).json()["id"]
    await served.settled(saga_id)
    await sign_in(served)
    page = (await served.client.get(f"/sagas/{saga_id}")).text
    assert "<script>" not in page
    assert "&lt;script&gt;alert(" in page


async def test_list_pages_on_with_its_filters_and_static_files_are_served(served: Stack) -> None:
    """The list keeps its filters on the next page; the stylesheet comes from the package."""
    for i in range(3):
        await served.client.post("/api/sagas", headers=alice(),
                                 json={"definition": "order", "input": {"order_id": f"o-{i}", "amount": 1}})
    await sign_in(served)
    served.security.open_reads = False
    listing = await served.client.get("/sagas", params={"definition": "order"})
    assert listing.status_code == 200
    assert listing.text.count('class="saga ') == 3
    css = await served.client.get("/static/console.css")
    assert css.status_code == 200
    assert "svg.saga-graph" in css.text
