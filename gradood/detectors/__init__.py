"""Detectors for any PyTorch classifier: one file per method on one small base
class (_base.Detector). Every detector returns ID-scores (higher = more
in-distribution) from `score(inputs)`; forward-only detectors also take
precomputed `score_features(logits, features)`."""

from gradood.detectors._base import Detector
from gradood.detectors.ash import ASH
from gradood.detectors.dice import DICE
from gradood.detectors.energy import Energy
from gradood.detectors.entropy import Entropy
from gradood.detectors.exgrad import ExGrad
from gradood.detectors.fdbd import FDBD
from gradood.detectors.full_gradnorm import FullGradNorm
from gradood.detectors.gen import GEN
from gradood.detectors.grad_uncertainty import GradUncertainty
from gradood.detectors.gradnorm import GradNorm
from gradood.detectors.gradorth import GradOrth
from gradood.detectors.grodin import GRODIN
from gradood.detectors.grood import GrOOD
from gradood.detectors.kl_matching import KLMatching
from gradood.detectors.knn import KNN
from gradood.detectors.lowdim_grad import LowDimGrad
from gradood.detectors.mahalanobis import Mahalanobis
from gradood.detectors.max_logit import MaxLogit
from gradood.detectors.msp import MSP
from gradood.detectors.nnguide import NNGuide
from gradood.detectors.odin import ODIN
from gradood.detectors.react import ReAct
from gradood.detectors.rg import RG, RGAdditive
from gradood.detectors.scale import SCALE
from gradood.detectors.she import SHE
from gradood.detectors.temperature_scaling import TemperatureScaling
from gradood.detectors.uv import UV
from gradood.detectors.vim import ViM

__all__ = [
    "Detector",
    "MSP",
    "TemperatureScaling",
    "MaxLogit",
    "Energy",
    "ODIN",
    "GradNorm",
    "ExGrad",
    "UV",
    "RG",
    "RGAdditive",
    "ReAct",
    "ASH",
    "SCALE",
    "DICE",
    "ViM",
    "KLMatching",
    "Entropy",
    "GEN",
    "Mahalanobis",
    "KNN",
    "NNGuide",
    "SHE",
    "FDBD",
    "GRODIN",
    "FullGradNorm",
    "GradUncertainty",
    "GrOOD",
    "GradOrth",
    "LowDimGrad",
]
