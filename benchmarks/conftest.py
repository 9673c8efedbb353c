import torch


def pytest_report_header(config):
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu only"
    return f"torch {torch.__version__}, threads {torch.get_num_threads()}, device: {device}"
