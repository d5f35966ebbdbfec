

def test_slimtrain_train_splits_torchrun_options_from_training_options():
    from torch.distributed.run import get_args_parser

    from slimtrain.launch import split_launcher_args, train_script

    parser = get_args_parser()
    launcher, training = split_launcher_args(
        ["--nproc-per-node", "2", "--master-port=29511", "--standalone", "--job.config_file", "x.toml",
         "--training.steps", "3"], parser)
    assert launcher == ["--nproc-per-node", "2", "--master-port=29511", "--standalone"]
    assert training == ["--job.config_file", "x.toml", "--training.steps", "3"]
    assert split_launcher_args(["--job.config_file", "x.toml"], parser) == ([], ["--job.config_file", "x.toml"])
    assert train_script().endswith("titan_integration/train.py")
