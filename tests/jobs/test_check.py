"""``freezeray check`` names the surgery op an error is about from the error's data (the
op the builder was applying, the vertex the error concerns), never from its wording."""

from types import SimpleNamespace

import pytest

import surgery
from jobs.check import _culprit
from surgery import TransferLearning
from surgery.edits import NInReplace, NOutReplace, RemoveVertexKeepConnections, SetFeatureExtractor
from surgery.graph import ShapeError, VertexError

OPS = [SetFeatureExtractor(vertices=["flatten"]), RemoveVertexKeepConnections(vertex="fc1"),
       NOutReplace(vertex="fc1", n_out=8), NInReplace(vertex="fc2", n_in=5)]
CFG = SimpleNamespace(surgery=OPS)


def test_the_op_the_builder_was_applying_is_the_culprit(tiny_name):
    with pytest.raises(VertexError) as caught:  # n_out_replace names what the removal took
        TransferLearning(surgery.zoo.load(tiny_name)).extend(OPS[1:3]).build()
    assert caught.value.op == OPS[2] and caught.value.vertex == "fc1"
    assert _culprit(CFG, caught.value) == "surgery[2].n_out_replace"


def test_a_shape_error_names_the_last_op_that_names_its_vertex(tiny_name):
    with pytest.raises(ShapeError) as caught:  # fc2 takes 5 inputs, fc1 gives 32
        TransferLearning(surgery.zoo.load(tiny_name)).extend([OPS[3]]).build()
    assert caught.value.vertex == "fc2"
    exc = ShapeError(str(caught.value), caught.value.vertex)  # without the op: found by its vertex
    assert _culprit(CFG, exc) == "surgery[3].n_in_replace"


def test_the_wording_of_an_error_decides_nothing():
    assert _culprit(CFG, ValueError("vertex 'fc2' and 'fc1' quoted in the text")) == "surgery"
    assert _culprit(CFG, VertexError("no vertex named in the data", "fc1")) == "surgery[2].n_out_replace"
