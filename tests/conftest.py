import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from core import checkpoints, engine  # noqa: E402

BUNDLED = {"vgg": ROOT / "checkpoints" / "fmnist_vgg.pt", "resnet": ROOT / "checkpoints" / "fmnist_resnet.pt"}

torch.set_num_threads(2)
# A page's unexpected error reaches the test (AppTest's `exception`, the browser's error box) instead of
# ui/guard.py's sentence; the test of that sentence unsets it.
os.environ["PRUNE_EXPLORER_PROPAGATE_ERRORS"] = "1"
# No background warm-up of the bundled models in the tests' servers and AppTest runs: a test that
# times a page must not share the CPU with it (the warm-up's own test runs it directly).
os.environ.setdefault("PRUNE_EXPLORER_WARM", "0")


@pytest.fixture(scope="session", params=sorted(BUNDLED))
def bundled(request):
    """(checkpoint, engine on the full 10,000-image test set) for each bundled model."""
    ckpt = checkpoints.load(BUNDLED[request.param])
    return ckpt, engine.from_checkpoint(ckpt, device="cpu")


# -- tiers: `./run check` runs every test not marked slow (pytest.ini); `./run test` runs them all ----
# A test is slow when it needs a full 10,000-image engine of a bundled model or a Streamlit run of a
# page (these fixtures), drives a real browser or child processes (these modules), or is one of the
# few long checks named here (each over about 4 s on two cores, `--durations` shows them).
SLOW_FIXTURES = {"bundled", "app", "vgg_engine", "bundled_programs", "student", "pair_engine"}
SLOW_MODULES = {"test_browser.py", "test_app.py"}
SLOW_TESTS = {
    "test_curve_page_offers_a_coarse_oracle_where_the_read_out_is_not_linear",
    "test_curve_page_compares_rules_with_a_scoreboard", "test_cli_sensitivity_writes_one_row_per_layer_and_fraction",
    "test_cli_sweep_of_the_mobilenet_equals_the_naive_procedure", "test_cli_slim_program_sweeps_to_the_masked_count",
    "test_prune_page_fine_tunes_and_removes_for_real", "test_range_spec_and_errors",
    "test_an_order_picked_on_training_images_is_scored_on_the_test_images",
    "test_parallel_sessions_each_see_exactly_their_own_accuracies", "test_every_cli_command_refuses_bad_files_in_one_line",
    "test_cli_model_without_conv_and_missing_data", "test_sweep_writes_exact_counts", "test_cli_rank_writes_the_engines_order",
    "test_siamese_prunes_both_calls_and_averages_both", "test_shortcut_keeps_accuracy_when_the_whole_layer_is_removed",
    "test_cli_writes_only_the_output_file", "test_rank_writes_every_channel_in_ascending_order",
    "test_magnitude_on_a_program_writes_a_program", "test_reranking_after_every_prune_gives_the_same_order",
    "test_the_warm_up_skips_rules_a_model_refuses_and_warms_the_rest", "test_crafted_archives_run_no_code_and_get_one_sentence",
    "test_every_conv_of_an_unseen_cnn_equals_the_naive_procedure", "test_sensitivity_rows_equal_the_naive_procedure",
    "test_middle_layer_over_its_memory_budget_recomputes_and_stays_exact", "test_cli_writes_one_row_per_step",
    "test_torchvision_model_prunes_exactly", "test_resnet18_with_one_input_channel_prunes_exactly_on_fashion_mnist",
}


def pytest_collection_modifyitems(items):
    for item in items:
        name = getattr(item, "originalname", item.name)
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())) or item.path.name in SLOW_MODULES \
                or name in SLOW_TESTS:
            item.add_marker(pytest.mark.slow)
