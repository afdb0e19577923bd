import pytest

from leukemia_mlops.data.naming import ALL, HEM, CellNameError, format_cell_name, parse_cell_name


@pytest.mark.parametrize(
    ("name", "subject", "image", "cell", "label"),
    [
        ("UID_57_29_1_all.bmp", "57", 29, 1, ALL),
        ("UID_H10_43_1_hem.bmp", "H10", 43, 1, HEM),
        ("UID_7_1_12_hem.bmp", "7", 1, 12, HEM),
        ("uid_H3_2_2_HEM.BMP", "H3", 2, 2, HEM),
    ],
)
def test_parses_cnmc_names(name, subject, image, cell, label):
    parsed = parse_cell_name(name)
    assert (parsed.subject, parsed.image_id, parsed.cell_id, parsed.label) == (
        subject,
        image,
        cell,
        label,
    )


def test_format_is_the_inverse_of_parse():
    name = format_cell_name("H12", 3, 4, HEM)
    assert name == "UID_H12_3_4_hem.bmp"
    assert parse_cell_name(name).file_name == name


@pytest.mark.parametrize(
    "name",
    [
        "1.bmp",
        "UID_57_29_all.bmp",
        "UID_57_29_1_blast.bmp",
        "UID_H5_1_1_all.bmp",
        "UID_x_1_1_all.bmp",
        "",
    ],
)
def test_rejects_names_outside_the_scheme(name):
    with pytest.raises(CellNameError):
        parse_cell_name(name)
