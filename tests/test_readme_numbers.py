"""The README's figures are what the commands give: the quick start's sample output and the table "Results on the
embedded digits" (`python benchmarks/readme_numbers.py --write` regenerates both). A change that moves a number
fails here until the README is regenerated. Other versions than those a block names round differently: there the
comparison is skipped (the block's own environment line says so to the reader)."""
import importlib.util
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tool():
  spec = importlib.util.spec_from_file_location('readme_numbers', os.path.join(ROOT, 'benchmarks', 'readme_numbers.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


tool = _tool()


def _readme() -> str:
  with open(tool.README) as f:
    return f.read()


def _skip_unless_computed_here(name: str) -> None:
  recorded = tool.parse_environment(tool.block(_readme(), name))
  current = tool.current_environment()
  if recorded != current:
    pytest.skip(f'README block {name!r} was computed with {recorded}; this is {current}')


def test_the_quick_start_excerpt_is_the_lines_a_terminal_shows():
  output = ('step 0/1 train:   0%|   | 0/8 [00:00<?, ?step/s]\nW0101 a warning\rstep 0/1 train:  50%|#  | 4/8 '
            '[00:01<00:01, 4.00step/s]\rstep 0/1 train: 100%|###| 8/8 [00:01<00:00, 7.10step/s, '
            'epoch=2, loss=0.5000]   \nstep 0: 2 classes  CNN 90.00%\nWARNING: something\nstep 1/1 train: 100%|###| 8/8 '
            '[00:01<00:00, 7.20step/s, epoch=2, loss=0.4000]\nstep 1: 4 classes  CNN 80.00%\nlucir on digits: 2 steps\n'
            '   a summary line\nresults written to /tmp/x/wd/results.json\n')
  got = tool.quick_start_output(output, '/tmp/x/wd/')
  assert got == ('step 0/1 train: 100%|###| 8/8 [00:01<00:00, 7.10step/s, epoch=2, loss=0.5000]\n'
                 'step 0: 2 classes  CNN 90.00%\n...\nstep 1: 4 classes  CNN 80.00%\nlucir on digits: 2 steps\n'
                 '   a summary line\nresults written to runs/lucir_digits/results.json')
  assert tool.mask_timing(got).startswith('step 0/1 train: 100%|###| 8/8 [TIME, RATE step/s, epoch=2, loss=0.5000]')


def test_the_readme_blocks_name_their_environment_and_the_quick_start_command():
  readme = _readme()
  assert f'python main.py --config=configs/{tool.QUICK_START} --workdir={tool.QUICK_START_WORKDIR}' in readme
  for name in tool.BLOCKS:
    env = tool.parse_environment(tool.block(readme, name))
    assert set(env) == {*tool.ENV_PACKAGES, 'backend', 'machine'}
    assert tool.replace_block(readme, name, tool.block(readme, name)) == readme


@pytest.mark.slow
def test_the_quick_start_output_in_the_readme_is_what_the_command_prints(tmp_path):
  _skip_unless_computed_here('quick_start')
  workdir = str(tmp_path / 'lucir_digits')
  output, _ = tool.run_main(tool.QUICK_START, workdir)
  shown = tool.quick_start_block(_readme())
  assert tool.mask_timing(tool.quick_start_output(output, workdir)) == tool.mask_timing(shown)


@pytest.mark.slow
def test_the_digits_table_in_the_readme_is_what_the_presets_give(digits_run):
  _skip_unless_computed_here('digits_table')
  results = {label: digits_run(*preset.split('.py:')) for label, preset in tool.TABLE_ROWS}
  assert tool.block(_readme(), 'digits_table') == tool.render('digits_table', tool.digits_table(results),
                                                              tool.current_environment())
