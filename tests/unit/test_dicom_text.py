"""DICOM names, dates and times written for people (web/dicom_text.py), and the Jinja filters
that show them: valid values formatted, anything else shown as it came, escaped, never a crash.
"""

from __future__ import annotations

import jinja2
import pytest

from projections.sql import search_name
from web.dicom_text import FILTERS, date, datetime, person_name, time


@pytest.mark.parametrize(("value", "shown"), [
    ("DOE^JOHN^^^", "DOE, JOHN"),
    ("SYNTHETIC^CT^SYNTH001", "SYNTHETIC, CT SYNTH001"),
    ("DOE^JOHN^Q^DR^JR", "DOE, DR JOHN Q, JR"),
    ("DOE", "DOE"),
    ("^JOHN", "JOHN"),
    ("DOE^JOHN=ドウ^ジョン", "DOE, JOHN"),  # the alphabetic group only
    ("Anonymized", "Anonymized"),
    ("^^^^", ""),
    ("", ""),
    (None, ""),
])
def test_person_names(value: object, shown: str) -> None:
    assert person_name(value) == shown


@pytest.mark.parametrize(("value", "shown"), [
    ("20240115", "2024-01-15"),
    (" 20240115 ", "2024-01-15"),
    ("2024-01-15", "2024-01-15"),
    ("20241315", "20241315"),  # month 13: shown as it came
    ("2024011", "2024011"),
    ("yesterday", "yesterday"),
    ("", ""),
    (None, ""),
])
def test_dates(value: object, shown: str) -> None:
    assert date(value) == shown


@pytest.mark.parametrize(("value", "shown"), [
    ("140322", "14:03:22"),
    ("140322.123456", "14:03:22"),
    ("1403", "14:03"),
    ("14", "14:00"),
    ("250000", "250000"),
    ("14:03:22", "14:03:22"),
    ("noon", "noon"),
    (None, ""),
])
def test_times(value: object, shown: str) -> None:
    assert time(value) == shown


@pytest.mark.parametrize(("value", "shown"), [
    ("20240115140322", "2024-01-15 14:03:22"),
    ("20240115140322.5+0100", "2024-01-15 14:03:22 +0100"),
    ("20240115", "2024-01-15"),
    ("20240199", "20240199"),
    ("2024011599", "2024011599"),
    ("x", "x"),
])
def test_datetimes(value: object, shown: str) -> None:
    assert datetime(value) == shown


def test_filters_escape_what_they_cannot_format() -> None:
    env = jinja2.Environment(autoescape=True)
    env.filters.update(FILTERS)
    page = env.from_string("{{ n | pn }}|{{ d | da }}|{{ t | tm }}|{{ x | dt }}")
    out = page.render(n="<script>^alert(1)", d="<b>2024</b>", t="1<2", x="../../etc")
    assert out == ("&lt;script&gt;, alert(1)|&lt;b&gt;2024&lt;/b&gt;|1&lt;2|../../etc")


@pytest.mark.parametrize(("typed", "searched"), [
    ("Doe, John", "Doe^John"), ("DOE ,J*", "DOE^J*"), ("doe", "doe"), ("DOE^J*", "DOE^J*"),
    ("O'Brien,  Mary Ann", "O'Brien^Mary Ann"), (",john", "^john"), ("Doe,", "Doe^"),
])
def test_a_name_typed_as_shown_is_searched_as_dicom_writes_it(typed: str, searched: str) -> None:
    assert search_name(typed) == searched


def test_remote_pacs_results_write_dates_for_people() -> None:
    """The Remote PACS search's series and study rows (C-FIND answers) show their dates as
    the Studies pages do."""
    from pathlib import Path

    import web

    folder = Path(web.__file__).parent / "templates"
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(folder), autoescape=True)
    env.filters.update(FILTERS)
    row = {"SeriesNumber": "1", "Modality": "CT", "SeriesDate": "20240115",
           "StudyDate": "20240116", "PatientBirthDate": "19700304",
           "PatientName": "DOE^JOHN", "StudyInstanceUID": "1.2.3", "SeriesInstanceUID": "1.2.3.4"}
    for level in ("SERIES", "STUDY"):
        out = env.get_template("_remote_results.html").render(
            level=level, results=[row], query={"study_instance_uid": "1.2.3"},
            user=type("U", (), {"can": staticmethod(lambda _: False)})())
        assert "2024011" not in out and "1970" not in out.replace("1970-03-04", ""), out
        assert ("2024-01-15" if level == "SERIES" else "2024-01-16") in out
