import pytest

from leukemia_mlops.data.naming import ALL, HEM, CellNameError, format_cell_name, parse_cell_name


@pytest.mark.parametrize(
    ("name", "subject", "image", "cell", "label"),
    [
        ("UID_57_29_1_all.bmp", "57", 29, 1, ALL),
        ("UID_H10_43_1_hem.bmp", "H10", 43, 1, HEM),
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
    ("name", "reason"),
    [
        ("1.bmp", "file name not of the form UID_<subject>_<image>_<cell>_<all|hem>"),
        ("UID_57_29_all.bmp", "not of the form"),
        ("UID_57_29_1_blast.bmp", "not of the form"),
        ("UID_x_1_1_all.bmp", "not of the form"),
        ("", "not of the form"),
        # The H of a healthy subject and the class must agree: no subject holds both labels.
        ("UID_H5_1_1_all.bmp", r"^subject H5 is marked healthy \(H\) but the cell is all$"),
        ("UID_7_1_12_hem.bmp", r"^subject 7 is not marked healthy \(H\) but the cell is hem$"),
    ],
)
def test_rejects_names_outside_the_scheme_with_the_reason(name, reason):
    with pytest.raises(CellNameError, match=reason):
        parse_cell_name(name)
